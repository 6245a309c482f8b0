"""The one kind of error a command reports as a sentence, with exit code 2.

A user's mistake (a setting out of range, a folder in use, a store that cannot be written, a
part key that does not exist) deserves one sentence naming the thing and what to do, not a
traceback; everything that raises this is caught once, in `cli.main`.
"""


class UsageError(RuntimeError):
    """A mistake of the user's: one sentence, exit 2."""
