"""Runs a typer app the way every pydgemma command behaves: a user-facing failure is one line on
stderr and exit status 1, a usage error exit status 2, Ctrl-C 130, and never a traceback unless
PYDGEMMA_DEBUG is set."""

from __future__ import annotations

import os
import signal
import sys
from typing import NoReturn

import typer

from .errors import PydgemmaError


def run_app(app: typer.Typer, user_errors: tuple[type[BaseException], ...] = ()) -> NoReturn:
    # Ctrl-C must work even when started with SIGINT ignored (e.g. from a shell's background job)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        rc = app(standalone_mode=False)
    except (PydgemmaError, *user_errors) as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as exc:  # a usage error, or a bug: still short, never a traceback
        # Usage errors are click exceptions (typer vendors click in recent releases, so match by shape).
        if callable(getattr(exc, "show", None)) and isinstance(getattr(exc, "exit_code", None), int):
            exc.show()
            sys.exit(exc.exit_code)
        if os.environ.get("PYDGEMMA_DEBUG"):
            raise
        typer.echo(f"error: internal error: {type(exc).__name__}: {exc} (set PYDGEMMA_DEBUG=1 for a traceback)", err=True)
        sys.exit(1)
    if rc == 130:  # typer turns Ctrl-C into exit status 130 without a word
        typer.echo("interrupted", err=True)
    sys.exit(rc if isinstance(rc, int) else 0)
