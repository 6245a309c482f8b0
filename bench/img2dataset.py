"""img2dataset as the benchmarks run it: the Python that has it, its command line, its results.

Its Python is --img2dataset-python, else $BENCH_IMG2DATASET_PYTHON, else the running one when it
can import img2dataset, else a venv made once under the user's cache folder
($XDG_CACHE_HOME or ~/.cache, laion-dagster-bench/img2dataset-VERSION) with img2dataset VERSION,
the release the figures in bench/README.md were measured with. It always runs with
NO_ALBUMENTATIONS_UPDATE=1 (bench/measure.py's client_env): albumentations, which it imports,
otherwise asks the internet whether a newer version of itself exists.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from bench.report import log

VERSION = "1.47.0"
ENV_VAR = "BENCH_IMG2DATASET_PYTHON"
COMMON = ["--input_format", "parquet", "--url_col", "URL", "--caption_col", "TEXT",
          "--output_format", "webdataset", "--timeout", "10", "--enable_wandb", "False"]
RAW = ["--resize_mode", "no", "--disable_all_reencoding", "True"]
RESIZED = ["--resize_mode", "keep_ratio", "--image_size", "256", "--encode_format", "jpg",
           "--encode_quality", "95"]


def add_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--img2dataset-python", default=None, help=(
        f"the Python with img2dataset installed (default: ${ENV_VAR}, else this one if it has "
        f"it, else a venv with img2dataset {VERSION} made once under ~/.cache)"))


def find_python(given: str | None) -> str:
    """The Python to run img2dataset with (see the module's docstring); logs which."""
    python = given or os.environ.get(ENV_VAR)
    if not python and importlib.util.find_spec("img2dataset"):
        python = sys.executable
    if not python:
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        venv = cache / "laion-dagster-bench" / f"img2dataset-{VERSION}"
        python = str(venv / "bin" / "python")
        if not (venv / "bin" / "img2dataset").exists():
            log(f"creating {venv} with img2dataset {VERSION} (once)")
            subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
            subprocess.run([python, "-m", "pip", "install", "-q", f"img2dataset=={VERSION}"],
                           check=True, env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"})
    version = subprocess.run(
        [python, "-c", "import importlib.metadata as m; print(m.version('img2dataset'))"],
        capture_output=True, text=True, env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"})
    if version.returncode != 0:
        last = (version.stderr.strip().splitlines() or ["?"])[-1]
        raise SystemExit(f"{python} cannot run img2dataset: {last}")
    log(f"img2dataset {version.stdout.strip()} with {python}")
    return python


def command(python: str, url_list: Path, out: Path, processes: int, threads: int,
            *options: str) -> list[str]:
    """img2dataset on parquet rows (URL, TEXT) into webdataset shards, 10 s timeout, `options`
    (RAW or RESIZED, and any other) after the common ones."""
    script = Path(python).with_name("img2dataset")
    start = [str(script)] if script.exists() else \
        [python, "-c", "from img2dataset import main; main()"]
    return [*start, "--url_list", str(url_list), "--output_folder", str(out),
            "--processes_count", str(processes), "--thread_count", str(threads), *COMMON,
            *options]


def stats(out: Path) -> tuple[int, int, Counter]:
    """Successes, failures and failures by status from a run's *_stats.json."""
    ok = failed = 0
    failures: Counter = Counter()
    for path in sorted(out.glob("*_stats.json")):
        shard = json.loads(path.read_text())
        ok += shard["successes"]
        failed += shard["failed_to_download"] + shard["failed_to_resize"]
        failures.update({k: v for k, v in shard.get("status_dict", {}).items()
                         if k != "success"})
    return ok, failed, failures


def rows(out: Path) -> Iterator[tuple[str, str, str | None]]:
    """(url, status, error message) of every row, from a run's shard parquet files."""
    import pyarrow.parquet as pq

    for path in sorted(out.glob("*.parquet")):
        for rec in pq.read_table(path, columns=["url", "status", "error_message"]).to_pylist():
            yield rec["url"], rec["status"], rec["error_message"]


def classify(status: str | None, message: str | None) -> str:
    """img2dataset's per-row status and error message, as one of the classes ours reports."""
    if status == "success":
        return "ok"
    text = message or ""
    low = text.lower()
    code = re.search(r"HTTP Error (\d{3})", text)
    if code:
        return "http_4xx" if code.group(1).startswith("4") else "http_5xx"
    if "x-robots-tag" in low:
        return "opted_out"
    if "timed out" in low or "timeout" in low:  # the TLS handshake's too
        return "timeout"
    if "certificate" in low or "ssl" in low:
        return "tls"
    if any(s in low for s in ("name or service not known", "name resolution",
                              "no address associated", "errno -2]", "errno -3]",
                              "errno -5]", "nodename nor servname")):
        return "dns"
    if any(s in low for s in ("refused", "no route to host", "unreachable",
                              "remote end closed", "reset by peer", "incompleteread",
                              "connection aborted", "broken pipe")):
        return "connection"
    if status == "failed_to_resize":
        return "decode_error"
    return "other"
