"""Child processes that do not outlive the command that started them.

`run` starts a worker pool, enqueue processes and the embedded Redis. Its own exits (the end,
Ctrl-C, SIGTERM) stop them in order; but a SIGKILL (the OOM killer) leaves no chance to, so
each child asks the kernel for a SIGTERM when its parent dies (Linux's PR_SET_PDEATHSIG): the
pool then finishes or hands back its shards, and the server flushes its append-only file.
"""

from __future__ import annotations

import contextlib
import ctypes
import signal

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """For `preexec_fn`: runs in the child between fork and exec. A no-op off Linux."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
