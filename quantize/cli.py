"""The `pydgemma-quantize` command: make DiffusionGemma GGUF files."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from .checkpoint import CheckpointError
from .convert import ConversionError

app = typer.Typer(
    name="pydgemma-quantize",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _root() -> None:
    """Make DiffusionGemma GGUF files from Hugging Face checkpoints.

    Examples:

      pydgemma-quantize convert ./diffusiongemma-26B-A4B-it -o dg-bf16.gguf

      pydgemma-quantize convert google/diffusiongemma-26B-A4B-it -o dg-q8_0.gguf --type q8_0
    """


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n} B"


@app.command()
def convert(
    source: str = typer.Argument(..., help="Checkpoint folder (config.json, *.safetensors, tokenizer files), "
                                           "or a repo id already in the local Hugging Face cache.", show_default=False),
    output: Path = typer.Option(..., "--output", "-o", help="The .gguf file to write.", show_default=False),
    out_type: Optional[str] = typer.Option(None, "--type", "-t",
                                           help="Weight type: f32, f16, bf16 or q8_0. Default: bf16 for a bf16 "
                                                "checkpoint, else f16. Norms, scales and the router stay f32."),
    force: bool = typer.Option(False, "--force", "-f", help="Replace OUTPUT if it exists."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary."),
) -> None:
    """Convert a Hugging Face DiffusionGemma checkpoint to GGUF (llama.cpp's diffusion-gemma layout).

    Reads the checkpoint tensor by tensor, so memory stays small whatever the model size. The file
    is written beside OUTPUT under a temporary name, checked by the native loader, then renamed:
    OUTPUT is never left half-written.
    """
    from .convert import convert as run_convert

    console = Console(stderr=True)
    started = time.monotonic()
    show = not quiet and console.is_terminal
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TimeRemainingColumn(), console=console, disable=not show, transient=False) as bar:
        tasks: dict[str, int] = {}

        def report(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                tasks[phase] = bar.add_task(phase, total=total)
            bar.update(tasks[phase], completed=done)

        result = run_convert(source, output, out_type=out_type, overwrite=force, progress=report)
    if quiet:
        return
    out = Console()
    out.print(f"wrote {result.path}")
    table = Table()
    table.add_column("type")
    table.add_column("tensors", justify="right")
    for name, count in sorted(result.type_counts.items()):
        table.add_row(name.lower(), str(count))
    out.print(table)
    out.print(f"{result.n_tensors} tensors, {_human(result.n_bytes)}, {time.monotonic() - started:.1f} s")


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # unwinds like Ctrl-C, so the temporary output file is removed


def main() -> None:
    """Entry point of the `pydgemma-quantize` command."""
    from pydgemma.cli_runner import run_app

    signal.signal(signal.SIGTERM, _terminate)
    run_app(app, (ConversionError, CheckpointError))


if __name__ == "__main__":
    main()
    sys.exit(0)
