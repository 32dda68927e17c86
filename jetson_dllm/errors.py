"""The one error type for user mistakes; the CLI prints it in one line and exits non-zero."""


class DllmError(Exception):
    """A mistake the user can fix: bad input, a missing file, an unsupported setting.

    The message says what went wrong and what to do next, in one line. `option` names the setting it is about as
    the command line spells it (`--steps`), where there is one: the server reports it as the request's field.
    """

    def __init__(self, message: str = "", option: str | None = None):
        super().__init__(message)
        self.option = option


def check_range(flag: str, value, low=None, high=None, low_open: bool = False, high_open: bool = False):
    """Refuse `value` outside [low, high] (open ends where asked), and NaN always: `--lr nan` is a mistake, not a
    number that passes every comparison. Returns the value."""
    import math

    if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float) and math.isnan(value)):
        raise DllmError(f"{flag} must be a number, got {value!r}", option=flag)
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if below or above:
        lo = "" if low is None else ("(" if low_open else "[") + f"{low:g}"
        hi = "" if high is None else f"{high:g}" + (")" if high_open else "]")
        raise DllmError(f"{flag} must be in {lo or '(-inf'}, {hi or 'inf)'}, got {value:g}", option=flag)
    return value


def check_choice(flag: str, value: str, choices) -> str:
    """Refuse a value that is not one of `choices`, listing them."""
    if value not in choices:
        raise DllmError(f"unknown {flag} {str(value)[:40]!r}; choose one of: {', '.join(choices)}", option=flag)
    return value
