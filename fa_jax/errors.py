"""The one exception type users see for their own mistakes (bad files, bad configs, bad arguments)."""


class FaJaxError(ValueError):
    """A user-facing error: the message names the file, parameter path or value and what was expected.

    The command line prints it as one line (no traceback); Python callers can catch it like a ValueError.
    """
