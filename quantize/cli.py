"""The `pydgemma-quantize` command: make DiffusionGemma GGUF files."""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from pydgemma.progress import phase_progress

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

      pydgemma-quantize quantize dg-bf16.gguf -o dg-Q4_K_M.gguf --type Q4_K_M

      pydgemma-quantize quantize dg-bf16.gguf --type Q4_K_M --dry-run

      pydgemma-quantize imatrix -m dg-bf16.gguf -f calibration.txt -o imatrix.gguf

      pydgemma-quantize quantize dg-bf16.gguf -o dg-IQ4_XS.gguf -t Q4_K_M --imatrix imatrix.gguf --tensor-type 'exps=IQ4_XS'

      pydgemma-quantize drift --ref dg-bf16.gguf -m dg-Q4_K_M.gguf -o drift.json --baseline thresholds.json
    """


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n} B"


SPLIT_HELP = ("Split the output into llama.cpp gguf-split parts of at most this much tensor data each: 40G, 500M, "
              "1.5G, 2GiB or bytes (K, M, G, T: powers of 1000, as llama.cpp's). -o out.gguf then writes "
              "out-00001-of-0000N.gguf, ...; load the first part. A model that fits in one part is written to OUTPUT.")


@app.command()
def convert(
    source: str = typer.Argument(..., help="Checkpoint folder (config.json, *.safetensors, tokenizer files), or a "
                                           "Hugging Face repo id (org/name[@revision]): its files are downloaded into "
                                           "the Hugging Face cache (resumable), or read from there with HF_HUB_OFFLINE=1.",
                                 show_default=False),
    output: Path = typer.Option(..., "--output", "-o", help="The .gguf file to write.", show_default=False),
    out_type: Optional[str] = typer.Option(None, "--type", "-t",
                                           help="Weight type: f32, f16, bf16 or q8_0. Default: bf16 for a bf16 "
                                                "checkpoint, else f16. Norms, scales and the router stay f32."),
    split_max_size: Optional[str] = typer.Option(None, "--split-max-size", help=SPLIT_HELP, show_default=False),
    force: bool = typer.Option(False, "--force", "-f", help="Replace OUTPUT if it exists."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary."),
) -> None:
    """Convert a Hugging Face DiffusionGemma checkpoint to GGUF (llama.cpp's diffusion-gemma layout).

    Reads the checkpoint tensor by tensor, so memory stays small whatever the model size. The file
    is written beside OUTPUT under a temporary name, checked by the native loader, then renamed:
    OUTPUT is never left half-written.
    """
    from .convert import convert as run_convert
    from .convert import parse_size

    split = parse_size(split_max_size) if split_max_size is not None else None
    started = time.monotonic()
    with phase_progress(not quiet and Console(stderr=True).is_terminal) as report:
        result = run_convert(source, output, out_type=out_type, overwrite=force, progress=report, split_max_size=split)
    if quiet:
        return
    out = Console()
    out.print(f"wrote {result.path}" if len(result.parts) == 1 else f"wrote {len(result.parts)} parts:")
    for part in result.parts if len(result.parts) > 1 else []:
        out.print(f"  {part}  {_human(part.stat().st_size)}")
    table = Table()
    table.add_column("type")
    table.add_column("tensors", justify="right")
    for name, count in sorted(result.type_counts.items()):
        table.add_row(name.lower(), str(count))
    out.print(table)
    out.print(f"{result.n_tensors} tensors, {_human(result.n_bytes)}, {time.monotonic() - started:.1f} s")


@app.command("quantize")
def quantize_cmd(
    source: str = typer.Argument(..., help="An F32/F16/BF16 .gguf (a split one by its first part), a GGUF on the "
                                 "Hugging Face Hub (org/repo:BF16), or a checkpoint folder or repo id (org/name).",
                                 show_default=False),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="The .gguf file to write.", show_default=False),
    mix: str = typer.Option(..., "--type", "-t", help="Q4_K_M, Q5_K_M, Q6_K, Q8_0, NVFP4, F16 or BF16.", show_default=False),
    tensor_type: list[str] = typer.Option([], "--tensor-type", help="REGEX=TYPE: force a type on matching tensors "
                                          "(repeatable; the last match wins), e.g. 'ffn_down_exps=Q8_0'."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan (tensor, type, bytes) and write nothing."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Quantization threads (default: all cores)."),
    imatrix: Optional[Path] = typer.Option(None, "--imatrix", help="An importance matrix (from 'pydgemma-quantize imatrix' "
                                           "or llama-imatrix, GGUF format): per-tensor weights for the quantizers. "
                                           "Needed by the IQ1/IQ2 types.", show_default=False),
    split_max_size: Optional[str] = typer.Option(None, "--split-max-size", help=SPLIT_HELP, show_default=False),
    force: bool = typer.Option(False, "--force", "-f", help="Replace OUTPUT if it exists."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary."),
) -> None:
    """Quantize a model with ggml's quantizers, using llama-quantize's per-tensor policy for the mix.

    Norms, scales, the router and every 1-D tensor stay F32; k-quants fall back where a row length is
    not a multiple of 256 (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0), NVFP4 where it is not a
    multiple of 64 (-> Q8_0). The output is written atomically, tensor by tensor.
    """
    from .convert import parse_size
    from .policy import parse_override
    from .quantize import choice_bytes, quantize

    try:
        overrides = [parse_override(spec) for spec in tensor_type]
    except ValueError as exc:
        raise ConversionError(str(exc)) from exc
    split = parse_size(split_max_size) if split_max_size is not None else None
    started = time.monotonic()
    with phase_progress(not quiet and not dry_run and Console(stderr=True).is_terminal) as report:
        result = quantize(source, output, mix=mix, overrides=overrides, n_threads=threads, overwrite=force,
                          dry_run=dry_run, progress=report, imatrix=imatrix, split_max_size=split)
    out = Console()
    if dry_run:  # plain aligned lines: never truncated, easy to grep
        width = max(len(c.name) for c in result.plan)
        typer.echo(f"{'tensor':{width}}  {'shape':>16}  {'type':7}  {'bytes':>14}  note")
        for c in result.plan:
            shape = "x".join(map(str, c.shape))
            typer.echo(f"{c.name:{width}}  {shape:>16}  {c.qtype.name:7}  {choice_bytes(c):>14,}  {c.note}".rstrip())
    if quiet and not dry_run:
        return
    summary = Table()
    summary.add_column("type")
    summary.add_column("tensors", justify="right")
    summary.add_column("size", justify="right")
    for name, (count, nbytes) in sorted(result.type_table().items()):
        summary.add_row(name, str(count), _human(nbytes))
    out.print(summary)
    where = f"wrote {result.path}" if result.path else "dry run: nothing written"
    if len(result.parts) > 1:
        where = f"wrote {len(result.parts)} parts"
    out.print(f"{where}: {len(result.plan)} tensors, {_human(result.n_bytes)}, {time.monotonic() - started:.1f} s")
    for part in result.parts if len(result.parts) > 1 else []:
        out.print(f"  {part}  {_human(part.stat().st_size)}")


@app.command("imatrix")
def imatrix_cmd(
    model: Path = typer.Option(..., "--model", "-m", help="The model (.gguf, or org/repo:QUANT on the Hugging Face Hub) to calibrate; the unquantized one is best.",
                               show_default=False),
    calibration: Path = typer.Option(..., "--file", "-f", help="Calibration text (UTF-8).", show_default=False),
    output: Path = typer.Option(..., "--output", "-o", help="The imatrix .gguf to write.", show_default=False),
    chunks: Optional[int] = typer.Option(None, "--chunks", help="Chunks to process (default: all of the text)."),
    chunk_size: int = typer.Option(512, "--chunk-size", help="Prompt tokens per chunk."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", help="Tokens generated after each chunk (whole canvases "
                                                                      "are denoised)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Denoising steps per canvas (default: the model's)."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed of the first chunk (chunk i uses seed + i)."),
    process_output: bool = typer.Option(False, "--process-output", help="Also collect the output head (stored under "
                                        "token_embd.weight when the head is tied), as llama-imatrix's flag."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or a device name."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads."),
    force: bool = typer.Option(False, "--force", help="Replace OUTPUT if it exists."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary."),
) -> None:
    """Compute an importance matrix from diffusion activations, in llama.cpp's imatrix GGUF format.

    The text is cut into chunks of --chunk-size tokens (the first of each replaced by BOS, as
    llama-imatrix does; a trailing partial chunk is dropped). Each chunk is the prompt of one real
    generation: the prompt's encoder pass, every denoising step of every canvas and the commits
    between canvases all add to the sums of squared inputs of every weight matrix (each MoE expert
    over the tokens routed to it). The file works with 'pydgemma-quantize quantize --imatrix' and
    with llama-quantize.
    """
    from .imatrix import collect, write_imatrix

    if output.exists() and not force:
        raise ConversionError(f"'{output}' already exists; use --force to replace it")
    try:
        text = calibration.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConversionError(f"cannot read the calibration text '{calibration}': {exc}") from exc
    console = Console(stderr=True)
    started = time.monotonic()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=console, disable=quiet or not console.is_terminal) as bar:
        task = bar.add_task("chunks", total=None)

        def report(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        im = collect(model, text, chunks=chunks, chunk_size=chunk_size, max_new_tokens=max_new_tokens, seed=seed,
                     max_steps=steps, process_output=process_output, dataset=str(calibration), device=device,
                     n_threads=threads, progress=report)
    write_imatrix(output, im, overwrite=force)
    if not quiet:
        typer.echo(f"wrote {output}: {len(im.entries)} entries, {im.chunk_count} chunks of {im.chunk_size} tokens, "
                        f"{time.monotonic() - started:.1f} s")


@app.command("drift")
def drift_cmd(
    model: Path = typer.Option(..., "--model", "-m", help="The quantized model to measure (.gguf, or org/repo:QUANT on the Hugging Face Hub).", show_default=False),
    ref: Optional[Path] = typer.Option(None, "--ref", help="The reference model (.gguf), e.g. the F32 or BF16 file "
                                       "MODEL was quantized from.", show_default=False),
    out: Path = typer.Option(..., "--out", "-o", help="The JSON report to write.", show_default=False),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="Prompts, one per line (rendered with the chat "
                                           "template). Default: the demo's Sudoku puzzles for the demo model, else "
                                           "a few built-in prompts.", show_default=False),
    canvases: Optional[int] = typer.Option(None, "--canvases", help="Canvases to measure in all. Default: 32.",
                                           show_default=False),
    per_prompt: Optional[int] = typer.Option(None, "--canvases-per-prompt", help="Canvases generated per prompt (the "
                                             "reference's answer is committed between them). Default: 1.",
                                             show_default=False),
    seed: Optional[int] = typer.Option(None, "--seed", help="Sampling seed of the first prompt (prompt i uses seed + i). "
                                       "Default: 0.", show_default=False),
    steps: Optional[int] = typer.Option(None, "--steps", help="Denoising steps per canvas at most (default: the "
                                        "reference's diffusion.eb_max_steps).", show_default=False),
    prompt_positions: Optional[int] = typer.Option(None, "--prompt-positions", help="Prompt prefixes probed per prompt "
                                                   "for the prompt-side next-token KL (0: none). Default: 4.",
                                                   show_default=False),
    buckets: int = typer.Option(8, "--position-buckets", help="Canvas position buckets of the per-position KL."),
    task: str = typer.Option("auto", "--task", help="auto (the demo's Sudoku when the demo model is measured without "
                             "--prompts), sudoku4 or none."),
    save_ref: Optional[Path] = typer.Option(None, "--save-ref", help="Store the reference run (.npz) for --ref-cache.",
                                            show_default=False),
    ref_cache: Optional[Path] = typer.Option(None, "--ref-cache", help="Replay a stored reference run instead of "
                                             "running --ref (its prompts, seed and settings are used).",
                                             show_default=False),
    baseline: Optional[Path] = typer.Option(None, "--baseline", help="Thresholds (JSON) to gate on: exit status 1 "
                                            "when any is exceeded.", show_default=False),
    baseline_key: Optional[str] = typer.Option(None, "--baseline-key", help="The threshold set to use when the "
                                               "baseline has several (\"models\": {KEY: {...}}).", show_default=False),
    markdown: Optional[Path] = typer.Option(None, "--markdown", help="Also write the summary as Markdown (for CI logs).",
                                            show_default=False),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Draw KL per step and per canvas position (.png; needs "
                                        "matplotlib: pip install 'pydgemma[plot]').", show_default=False),
    device: str = typer.Option("auto", "--device", help="auto, cpu or a device name."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads."),
    sc_top_k: int = typer.Option(0, "--sc-top-k", min=0, help="Run the measured model with APPROXIMATE self-conditioning "
                                 "over each position's k likeliest tokens (the reference stays exact): with --ref and "
                                 "-m the same file, this measures the approximation alone."),
    kv_type: str = typer.Option("f32", "--kv-type", help="The measured model's KV cache entries: f32 (default: the "
                                "drift is the quantization's alone), f16 (the runtime's default) or q8_0. The reference "
                                "always runs F32 entries."),
    sc_table: str = typer.Option("f32", "--sc-table", help="The measured model's self-conditioning table: f32 (default, "
                                 "as the reference's), auto (the runtime's default), f16 or q8_0. With --ref and -m the "
                                 "same file, --kv-type / --sc-table measure those choices alone."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary table."),
) -> None:
    """Measure how far a quantized model drifts from its reference, as a diffusion model degrades.

    The reference runs real generations (prompt, every denoising step, commits between canvases).
    The model under test is teacher-forced on the same inputs (prompt, canvas and
    self-conditioning input of every step) and compared: KL(ref || model) of the processed
    distributions (overall, per denoising step, per canvas position bucket), top-1 agreement and
    the Jaccard overlap of the sampler's accept sets. Both also run freely with the same seed:
    final canvas agreement, steps per canvas to converge, tokens per forward. Also: a prompt-side
    next-token KL, and the Sudoku accuracy when the demo model is measured.

    With --baseline, exits 1 when a threshold (max_mean_kl, min_top1, max_steps_increase_pct, ...)
    is exceeded, naming it; usage errors exit 2.

    Examples:

      pydgemma-quantize drift --ref dg-f32.gguf -m dg-Q4_K_M.gguf -o drift.json

      pydgemma-quantize drift --ref dg-f32.gguf -m dg-Q8_0.gguf -o q8.json --save-ref ref.npz

      pydgemma-quantize drift --ref-cache ref.npz -m dg-Q4_K_M.gguf -o q4.json --baseline base.json --baseline-key Q4_K_M
    """
    from pydgemma.hub import is_hub_ref

    from .drift import DriftUsageError, check, load_baseline, measure, read_prompts
    from .drift_report import markdown as render_markdown
    from .drift_report import plot as draw_plot
    from .drift_report import print_summary, verdict

    try:
        for path, flag in ((model, "--model"), (ref, "--ref"), (ref_cache, "--ref-cache"), (prompts, "--prompts"),
                           (baseline, "--baseline")):
            if path is not None and not path.is_file() and not (flag in ("--model", "--ref") and is_hub_ref(path)):
                raise DriftUsageError(f"{flag}: no such file '{path}'")
        for path, flag in ((out, "--out"), (markdown, "--markdown"), (plot, "--plot"), (save_ref, "--save-ref")):
            if path is not None and not path.resolve().parent.is_dir():
                raise DriftUsageError(f"{flag}: the folder of '{path}' does not exist")
        if plot is not None:
            try:
                import matplotlib  # noqa: F401
            except ImportError:
                raise DriftUsageError("--plot needs matplotlib: pip install 'pydgemma[plot]'") from None
        thresholds = load_baseline(baseline, baseline_key) if baseline is not None else None
        if baseline is None and baseline_key is not None:
            raise DriftUsageError("--baseline-key needs --baseline")
        prompt_list = read_prompts(prompts) if prompts is not None else None
        console = Console(stderr=True)
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      TimeRemainingColumn(), console=console, disable=quiet or not console.is_terminal) as bar:
            job = bar.add_task("prompts", total=None)

            def report_progress(done: int, total: int) -> None:
                bar.update(job, completed=done, total=total)

            report = measure(model, ref_path=ref, ref_cache=ref_cache, save_ref=save_ref, prompts=prompt_list, task=task,
                             canvases=canvases, canvases_per_prompt=per_prompt, seed=seed, max_steps=steps,
                             probe_positions=prompt_positions, position_buckets=buckets, device=device,
                             n_threads=threads, progress=report_progress, sc_top_k=sc_top_k,
                             kv_type=kv_type, sc_table=sc_table)
        checks = check(report, thresholds) if thresholds is not None else []
    except DriftUsageError as exc:
        raise typer.BadParameter(str(exc)) from None
    if thresholds is not None:
        report["gate"] = {"baseline": str(baseline), "key": baseline_key, "passed": all(c.ok for c in checks),
                          "checks": [vars(c) for c in checks]}
    try:
        out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
        if markdown is not None:
            markdown.write_text(render_markdown(report, checks), encoding="utf-8")
        if plot is not None:
            draw_plot(report, plot)
    except OSError as exc:
        raise ConversionError(f"cannot write the report: {exc}") from exc
    if not quiet:
        print_summary(report, checks, Console())
    if any(not c.ok for c in checks):
        typer.echo(f"error: {verdict(checks)}", err=True)
        raise typer.Exit(1)


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
