"""What every `dllm` verb shares: the app, the two consoles, option parsers, and the progress bar."""

from __future__ import annotations

import re
import sys

import typer
import typer.core
from rich.console import Console

from jetson_dllm.errors import DllmError


def _no_type_for_flags() -> None:
    """typer 0.29 shows a type placeholder for every option, `<bool>` on flags too (`--resume <bool>`, which reads
    as if it took a value): flags show none. Other typer versions are left as they are."""
    option = getattr(typer.core, "TyperOption", None)
    shown = getattr(option, "display_type_rich", None)
    if shown is None:
        return

    def display_type_rich(self, ctx):
        return None if getattr(self, "is_flag", False) or getattr(self, "is_bool_flag", False) else shown(self, ctx)

    option.display_type_rich = display_type_rich


_no_type_for_flags()
app = typer.Typer(
    name="dllm",
    help="Train masked-diffusion language models on a desktop and run them fast on a Jetson.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    rich_markup_mode="rich",
)
# Results go to stdout, progress and notes to stderr. Piped output gets room for wide tables, and text is never
# wrapped into it (soft_wrap): a generated story reaches the pipe exactly as generated.
out = Console(highlight=False, width=None if sys.stdout.isatty() else 160, soft_wrap=not sys.stdout.isatty())
err = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 160, soft_wrap=not sys.stderr.isatty())


class working:  # noqa: N801 (a context manager, used as `with working("exporting") as status`)
    """Long work's progress on stderr: a spinner on a terminal; piped, each update as a line with the time so far,
    and a line at least every `every` seconds while nothing else is said (so a log never looks like a hang). Nothing
    is printed before the first update or the first interval: a refusal stays the one line it is."""

    def __init__(self, what: str, every: float = 30.0, console: Console | None = None):
        self.console, self.what, self.every = console or err, what, every
        self.tty = self.console.is_terminal
        self.last = self.t0 = 0.0

    def __enter__(self):
        import threading
        import time

        self.t0 = self.last = time.monotonic()
        if self.tty:
            self.status = self.console.status(self.what)
            self.status.__enter__()
            return self
        self.done = threading.Event()  # (nothing printed yet: a refusal in the first seconds stays one line)
        self.beat = threading.Thread(target=self._beat, daemon=True)
        self.beat.start()
        return self

    def update(self, message: str) -> None:
        self.what = message
        if self.tty:
            self.status.update(message)
        else:
            self.line(message)

    def line(self, message: str, still: bool = False) -> None:
        import time

        self.last = time.monotonic()
        self.console.print(f"[{self.last - self.t0:5.0f} s] {'still: ' if still else ''}{message}", markup=False, highlight=False)

    def _beat(self) -> None:
        import time

        while not self.done.wait(min(self.every, 1.0)):
            if time.monotonic() - self.last >= self.every:
                self.line(self.what, still=True)

    def __exit__(self, *exc) -> bool:
        if self.tty:
            self.status.__exit__(*exc)
        else:
            self.done.set()
            self.beat.join(timeout=2)
        return False


def parse_duration(text: str) -> float:
    """Seconds from "90", "90s", "5m", "1h30m"."""
    text = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)([hms])", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise DllmError(f"cannot read the duration {text!r}; write it like 90s, 20m or 1h30m")
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)


def int_list(text: str, what: str) -> list[int]:
    """Comma-separated positive integers, e.g. --steps 8,16,32."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise DllmError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise DllmError(f"{what} must be positive integers, got {text!r}")
    return values


def names(text: str) -> list[str]:
    """Comma-separated names, e.g. --backend torch,onnx."""
    return [v.strip() for v in text.split(",") if v.strip()]


class Bar:
    """A rich progress bar fed by progress(phase, done, total) callbacks; silent when not a terminal."""

    def __init__(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.percentage:>3.0f}%"),
                                 TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=err, disable=not err.is_terminal)
        self.tasks: dict[str, int] = {}

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def __call__(self, phase: str, done: float, total: float | None) -> None:
        if phase not in self.tasks:
            self.tasks[phase] = self.progress.add_task(phase, total=total)
        self.progress.update(self.tasks[phase], completed=done, total=total)


def given_options(ctx) -> set[str]:
    """The parameters the user set on the command line (not left at their defaults). Matched by the source's name:
    typer may carry its own copy of click, so its enum is not necessarily click's."""
    return {name for name in ctx.params if getattr(ctx.get_parameter_source(name), "name", "") == "COMMANDLINE"}
