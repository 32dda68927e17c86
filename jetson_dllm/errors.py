"""The one error type for user mistakes; the CLI prints it in one line and exits non-zero."""


class DllmError(Exception):
    """A mistake the user can fix: bad input, a missing file, an unsupported setting.

    The message says what went wrong and what to do next, in one line.
    """
