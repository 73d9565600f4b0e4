"""`ddpo` command entry point: user errors become one line on stderr and exit code 2 (DESIGN.md §4)."""

from __future__ import annotations

import os
import sys
import traceback

EXIT_USAGE = 2
EXIT_FAILURE = 1


def _fail(code: int, message: str) -> None:
    if os.environ.get("DDPO_DEBUG") == "1":
        traceback.print_exc()
    print(f"ddpo: error: {message}", file=sys.stderr)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; `DDPO_DEBUG=1` prints the traceback of any error."""
    import typer
    from typer.main import get_command

    from ddpo.cli.app import build_app
    from ddpo.core.configuration.errors import UsageError
    from ddpo.core.engine.guards import INTERRUPTED_EXIT_CODE, RunInterrupted
    from ddpo.core.engine.startup import quiet_bitsandbytes_kernel_warning

    quiet_bitsandbytes_kernel_warning()

    try:
        command = get_command(build_app())
        exit_code = command.main(args=argv, prog_name="ddpo", standalone_mode=False)
    except UsageError as error:
        _fail(EXIT_USAGE, str(error))
    except RunInterrupted as error:
        if not error.report:  # another process of the run reports the stop
            sys.exit(INTERRUPTED_EXIT_CODE)
        _fail(INTERRUPTED_EXIT_CODE, str(error))
    except typer.Abort:
        _fail(130, "aborted")
    except typer.TyperException as error:  # the command-line parser's own errors (bad flag, bad value)
        code = getattr(error, "exit_code", EXIT_USAGE)
        _fail(code, error.format_message() if hasattr(error, "format_message") else str(error))
    except KeyboardInterrupt:
        _fail(130, "interrupted; the last completed epoch's checkpoint is intact (continue with --resume RUN_DIR)")
    except Exception as error:
        hint = "" if os.environ.get("DDPO_DEBUG") == "1" else " (DDPO_DEBUG=1 shows the traceback)"
        _fail(EXIT_FAILURE, f"{type(error).__name__}: {error}{hint}")
    if exit_code == INTERRUPTED_EXIT_CODE:  # Ctrl-C outside a run's epochs: the command framework's own exit
        _fail(INTERRUPTED_EXIT_CODE, "interrupted")
    sys.exit(exit_code if isinstance(exit_code, int) else 0)
