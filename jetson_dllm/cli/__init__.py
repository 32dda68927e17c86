"""The `dllm` command: each verb parses its options, calls one library function, and prints the result.

One module per group of verbs (`host`: data, train, eval, export; `generation`: run; `serve`: serve;
`device`: configs, inspect, build, bench, profile); tables live in `jetson_dllm.tables`. Heavy libraries (torch, onnxruntime,
tensorrt, pycuda) are imported inside the verbs that need them, so `dllm --help` works on a Jetson without torch.
"""

from __future__ import annotations

import sys

from jetson_dllm.cli import device, generation, host, serve  # noqa: F401  (each module registers its verbs on the app)
from jetson_dllm.cli.common import app, int_list, parse_duration
from jetson_dllm.errors import DllmError
from jetson_dllm.threads import quiet_waiting

__all__ = ["app", "entry", "int_list", "main", "parse_duration"]

# `dllm --help` lists the verbs in the order a user meets them.
VERBS = ("data", "train", "import", "eval", "export", "run", "serve", "inspect", "build", "bench", "profile", "configs")
app.registered_commands.sort(key=lambda c: VERBS.index(c.name or c.callback.__name__))


def main(argv: list[str] | None = None) -> int:
    """Run the CLI. A user mistake prints one line (`error: ...`) and returns 1; a usage error prints the usage
    and a one-line reason and returns 2; never a traceback."""
    try:
        code = app(args=argv, prog_name="dllm", standalone_mode=False)
        return code if isinstance(code, int) else 0
    except DllmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        # click's exceptions, or typer's own copies of them (typer >= 0.29 carries its own click): matched by
        # what they can do, not by class, so either works.
        if type(e).__module__.split(".")[0] not in ("click", "typer"):
            raise
        if hasattr(e, "show"):  # UsageError (exit 2), ClickException (exit 1)
            e.show()
            return int(getattr(e, "exit_code", 1))
        if hasattr(e, "exit_code"):  # Exit
            return int(e.exit_code)
        print("interrupted", file=sys.stderr)  # Abort
        return 130


def entry() -> None:
    quiet_waiting()  # before any verb loads torch: OpenMP reads its wait policy once, at load
    sys.exit(main())
