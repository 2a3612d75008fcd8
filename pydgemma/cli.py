"""The ``pydgemma`` command line."""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from ._version import __version__

app = typer.Typer(
    name="pydgemma",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

_stdout = Console(highlight=False)


def _version_callback(value: bool) -> None:
    if value:
        from . import ggml_version, native_version

        typer.echo(f"pydgemma {__version__} (native core {native_version()}, ggml {ggml_version()})")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", "-V", help="Print the versions of pydgemma, its native core and ggml.",
        callback=_version_callback, is_eager=True,
    ),
) -> None:
    """Run DiffusionGemma GGUF models on a CPU or a GPU.

    Examples:

      pydgemma info -m model.gguf            check a model file and describe it

      pydgemma info -m model.gguf --json     the same, as JSON for scripts

      pydgemma run -m ORG/REPO:Q4_K_M -p hi  a model from the Hugging Face Hub

      pydgemma pull ORG/REPO:Q8_0            download it only (see: pydgemma list)
    """


MODEL_HELP = ("A DiffusionGemma .gguf file (a split one by its first part), or a model on the Hugging Face Hub: "
              "org/repo[:QUANT][@revision] (e.g. unsloth/diffusiongemma-26B-A4B-it-GGUF:Q4_K_M), downloaded once "
              "into the Hugging Face cache.")
OFFLINE_HELP = "Use the Hugging Face cache only, never the network (as HF_HUB_OFFLINE=1 does)."


def _offline(flag: bool) -> bool | None:
    return True if flag else None  # None: $HF_HUB_OFFLINE decides


def _human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{n} B"


def _type_histogram(model) -> dict[str, dict[str, int]]:
    counts: Counter[str] = Counter()
    sizes: Counter[str] = Counter()
    for t in model.tensors.values():
        counts[t.type] += 1
        sizes[t.type] += t.n_bytes
    return {name: {"count": counts[name], "bytes": sizes[name]} for name in sorted(counts, key=lambda k: -sizes[k])}


def _info_dict(model, device_list) -> dict:
    return {
        "path": os.path.abspath(model.path),
        "file_size": model.file_size,
        "split_parts": int(model.metadata.get("split.count", 1) or 1),
        "architecture": model.architecture,
        "name": model.name,
        "hparams": dict(model.hparams),
        "layers": [
            {"index": l.index, "sliding": l.is_sliding, "n_head_kv": l.n_head_kv, "head_dim": l.head_dim, "has_v_proj": l.has_v_proj}
            for l in model.layers
        ],
        "tensor_count": len(model.tensors),
        "tensor_types": _type_histogram(model),
        "diffusion": {k: v for k, v in model.metadata.items() if k.startswith("diffusion.")},
        "device": model.device,
        "n_threads": model.n_threads,
        "devices": [d.to_dict() for d in device_list],
    }


def _print_info(info: dict) -> None:
    con = _stdout
    con.print(f"[bold]{info['name']}[/bold]  {info['path']}")
    parts = f" in {info['split_parts']} parts (gguf-split)" if info["split_parts"] > 1 else ""
    con.print(f"architecture {info['architecture']}, {info['tensor_count']} tensors, {_human_bytes(info['file_size'])}{parts}")

    hp = Table(title="hyper-parameters", show_header=False, title_justify="left")
    hp.add_column("key", style="cyan")
    hp.add_column("value", justify="right")
    for key, value in info["hparams"].items():
        hp.add_row(key, f"{value:.6g}" if isinstance(value, float) else str(value))
    con.print(hp)
    con.print(f"layers: {_layer_pattern_from(info)}")

    if info["diffusion"]:
        diff = Table(title="diffusion metadata", show_header=False, title_justify="left")
        diff.add_column("key", style="cyan")
        diff.add_column("value", justify="right")
        for key, value in info["diffusion"].items():
            diff.add_row(key, value)
        con.print(diff)

    types = Table(title="tensor types", title_justify="left")
    types.add_column("type", style="cyan")
    types.add_column("tensors", justify="right")
    types.add_column("size", justify="right")
    for name, row in info["tensor_types"].items():
        types.add_row(name, str(row["count"]), _human_bytes(row["bytes"]))
    con.print(types)

    devs = Table(title="devices", title_justify="left")
    for col in ("name", "type", "description", "free", "total"):
        devs.add_column(col, justify="right" if col in ("free", "total") else "left")
    for d in info["devices"]:
        mark = " *" if d["name"] == info["device"] else ""
        devs.add_row(d["name"] + mark, d["type"], d["description"], _human_bytes(d["memory_free"]), _human_bytes(d["memory_total"]))
    con.print(devs)
    con.print(f"model device: {info['device']} (*), {info['n_threads']} CPU threads")


def _layer_pattern_from(info: dict) -> str:
    full = [l["index"] for l in info["layers"] if not l["sliding"]]
    n_sliding = len(info["layers"]) - len(full)
    shown = ", ".join(map(str, full[:12])) + (", ..." if len(full) > 12 else "")
    return f"{n_sliding} sliding-window, {len(full)} full" + (f" (full: {shown})" if full else "")


@app.command()
def info(
    model: str = typer.Option(..., "--model", "-m", help=MODEL_HELP, show_default=False),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
    offline: bool = typer.Option(False, "--offline", help=OFFLINE_HELP),
    device: str = typer.Option("auto", "--device", "-d", help="'auto' (first GPU, else CPU), 'cpu', or a device name."),
    n_ctx: Optional[int] = typer.Option(None, "--n-ctx", min=1, help="Plan the memory of a context of this many "
                                        "tokens (default: min(4096, the model's))."),
    kv_type: str = typer.Option("f16", "--kv-type", help="The planned KV cache's entries: f16, f32 or q8_0."),
    sc_top_k: int = typer.Option(0, "--sc-top-k", min=0, help="Plan approximate self-conditioning (no table)."),
) -> None:
    """Validate a model file and describe it: hyper-parameters, tensor types, devices, and the
    memory a context takes on the model's device (weights, KV cache, self-conditioning, compute),
    and whether it fits.

    Examples:

      pydgemma info -m model.gguf

      pydgemma info -m model.gguf --n-ctx 131072 --kv-type q8_0 --device CUDA0

      pydgemma info -m unsloth/diffusiongemma-26B-A4B-it-GGUF:Q4_K_M --n-ctx 32768

    Exits with status 1 and a one-line reason if the file is not a valid DiffusionGemma GGUF.
    """
    from .devices import devices
    from .model import Model

    with Model(model, device=device, offline=_offline(offline)) as m:
        data = _info_dict(m, devices())
        data["memory_plan"] = m.plan_memory(n_ctx, kv_type=kv_type, sc_top_k=sc_top_k)
    if json_output:
        typer.echo(json.dumps(data, indent=2))
    else:
        _print_info(data)
        _print_plan(data["memory_plan"])


PLAN_ROWS = (("weights_copied", "weights (device memory)"), ("weights_mapped", "weights (mapped from the file)"),
             ("kv", "KV cache"), ("self_cond_table", "self-conditioning table"),
             ("self_cond_state", "self-conditioning state"), ("compute", "compute buffers (estimate)"))


def _print_plan(plan: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    con.print(f"memory of a context of {plan['n_ctx']} tokens on {plan['device']} "
              f"(KV {plan['kv_type']}, {'flash attention' if plan['flash_attn'] else 'matmul attention'})", soft_wrap=True)
    table = Table()
    table.add_column("part", style="cyan")
    table.add_column("size", justify="right")
    for key, label in PLAN_ROWS:
        table.add_row(label, _human_bytes(plan[key]))
    table.add_row("total", _human_bytes(plan["total"]), style="bold")
    if plan["device_free"]:
        table.add_row("device free / total", f"{_human_bytes(plan['device_free'])} / {_human_bytes(plan['device_total'])}")
    con.print(table)
    con.print("fits" if plan["fits"] else "[bold red]does not fit[/]: use a smaller --n-ctx, --kv-type q8_0, or another device")


@app.command()
def run(
    model: Optional[str] = typer.Option(None, "--model", "-m", show_default=False,
                                        help=MODEL_HELP + " Default: the bundled demo model, a tiny DiffusionGemma "
                                             "that solves 4x4 Sudoku."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="The prompt (one user turn). '-' reads stdin. "
                                         "With the demo model and no prompt: a sample puzzle."),
    interactive: bool = typer.Option(False, "--interactive", "-i", help="Chat: a prompt per line, history kept."),
    visual: bool = typer.Option(False, "--visual", help="Watch the canvas denoise (accepted tokens bold, noise dim)."),
    think: bool = typer.Option(False, "--think", help="Let the model think first; thoughts are shown apart."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed (same seed, same answer). Default: random."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Denoising steps per canvas (default: the model's, 48)."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", "-n",
                                             help="Tokens to generate at most (default: one canvas, 256 for the 26B)."),
    threads: Optional[int] = typer.Option(None, "--threads", "-t", help="CPU threads (default: physical cores)."),
    device: str = typer.Option("auto", "--device", "-d", help="'auto', 'cpu', or a device name (see 'info')."),
    system: Optional[str] = typer.Option(None, "--system", help="A system prompt for --interactive."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON object: text, thinking, tokens, stats."),
    sc_top_k: int = typer.Option(0, "--sc-top-k", min=0, help="APPROXIMATE self-conditioning over each position's "
                                 "k likeliest tokens (faster; changes the output). 0 = exact."),
    kv_type: str = typer.Option("f16", "--kv-type", help="KV cache entries: f16 (default), f32 (exact), q8_0 "
                                "(half of f16's memory; flash attention). See 'pydgemma info --n-ctx'."),
    offline: bool = typer.Option(False, "--offline", help=OFFLINE_HELP),
) -> None:
    """Generate text from a prompt, or chat with -i. With no model, the bundled demo solves a Sudoku.

    Examples:

      pydgemma run                       the demo: a 4x4 Sudoku solved by diffusion (add --visual)

      pydgemma run -m model.gguf -p "Write a haiku about rivers"

      pydgemma run -m unsloth/diffusiongemma-26B-A4B-it-GGUF:Q4_K_M -p "hi"   (downloads ~16 GB once)

      pydgemma run -m model.gguf -p "hi" --seed 3 --json

      pydgemma run -m model.gguf -i --visual
    """
    import random

    from .model import Model
    from .run_cli import interactive as chat_loop
    from .run_cli import run_once

    from .run_cli import demo_model_path, run_demo

    demo = model is None
    if demo:
        model = demo_model_path()
    if not interactive and prompt is None and not demo:
        raise typer.BadParameter("give a prompt with -p, or chat with -i", param_hint="'--prompt'")
    if prompt == "-":
        prompt = sys.stdin.read()
    m = Model(model, device=device, n_threads=threads, offline=_offline(offline))
    options = {"seed": seed if seed is not None else random.randrange(2**63), "max_steps": steps,
               "max_new_tokens": max_tokens or m.hparams["canvas_length"]}
    if sc_top_k:
        options["sc_top_k"] = sc_top_k
    options["kv_type"] = kv_type
    if interactive:
        raise typer.Exit(chat_loop(m, options, think=think, visual=visual, system=system))
    if demo and prompt is None:
        raise typer.Exit(run_demo(m, options, visual=visual, as_json=json_output))
    raise typer.Exit(run_once(m, prompt or "", options, visual=visual, as_json=json_output, think=think))


@app.command()
def demo(
    eval_n: int = typer.Option(100, "--eval", help="Fresh puzzles to solve and check."),
    seed: int = typer.Option(0, "--seed", help="Seed of the puzzle generator (puzzle i also samples with seed + i)."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="Another Sudoku model (default: the bundled one)."),
    threads: Optional[int] = typer.Option(None, "--threads", "-t", help="CPU threads (default: physical cores)."),
) -> None:
    """Measure the demo model: solve N fresh 4x4 Sudoku puzzles and check every answer exactly.

    Example: pydgemma demo --eval 200 --seed 7
    """
    import random as _random

    from .model import Model
    from .models.demo import sudoku
    from .run_cli import demo_model_path

    m = Model(model or demo_model_path(), n_threads=threads)
    rng = _random.Random(seed)
    solved = steps = forwards = tokens = 0
    started = time.perf_counter()
    for i in range(eval_n):
        puzzle, _ = sudoku.make_puzzle(rng)
        gen = m.generate(sudoku.prompt_text(puzzle), max_new_tokens=m.hparams["canvas_length"], seed=seed + i)
        solved += sudoku.check_answer(puzzle, gen.text)
        steps += sum(gen.steps)
        forwards += gen.n_forwards
        tokens += len(gen.tokens)
    elapsed = time.perf_counter() - started
    typer.echo(f"accuracy: {100 * solved / eval_n:.1f}% ({solved}/{eval_n} solved exactly)")
    typer.echo(f"mean steps per canvas: {steps / eval_n:.2f}")
    typer.echo(f"tokens per forward: {tokens / forwards:.2f}" if forwards else "tokens per forward: -")
    typer.echo(f"{eval_n / elapsed:.1f} puzzles/s")


@app.command()
def bench(
    model: str = typer.Option(..., "--model", "-m", help=MODEL_HELP, show_default=False),
    prompt_tokens: int = typer.Option(64, "--prompt-tokens", help="Random prompt length."),
    canvases: int = typer.Option(1, "--canvases", help="Canvases to generate in the end-to-end run."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Denoising steps per canvas (default: the model's)."),
    fixed_steps: bool = typer.Option(False, "--fixed-steps", help="No adaptive stopping: every canvas runs all steps."),
    repeat: int = typer.Option(5, "--repeat", help="Measurements per figure (medians are reported)."),
    threads: Optional[int] = typer.Option(None, "--threads", "-t", help="CPU threads (default: physical cores)."),
    device: str = typer.Option("auto", "--device", "-d", help="'auto', 'cpu', or a device name."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON object."),
    sc_top_k: int = typer.Option(0, "--sc-top-k", min=0, help="Measure APPROXIMATE self-conditioning over each "
                                 "position's k likeliest tokens. 0 = exact."),
    offline: bool = typer.Option(False, "--offline", help=OFFLINE_HELP),
) -> None:
    """Measure prefill speed, the cost of one denoising step and a whole generation on this machine.

    Two steps are measured: the inspection path (dg_denoise: forward, self-conditioning from host
    logits, the host sampler over them) and the device step that generation runs (the graph with the
    sampler's reductions, the host's decisions, Python), with the bytes it moves per step.

    Example: pydgemma bench -m model.gguf --steps 16 --fixed-steps
    """
    from .bench import run_bench
    from .model import Model

    m = Model(model, device=device, n_threads=threads, offline=_offline(offline))
    r = run_bench(m, prompt_tokens=prompt_tokens, canvases=canvases, steps=steps, fixed_steps=fixed_steps, repeat=repeat,
                  sc_top_k=sc_top_k)
    if json_output:
        typer.echo(json.dumps(r, indent=2))
        return
    d, g = r["denoise_step"], r["generation"]
    table = Table(title=f"{Path(m.path).name} on {m.device}, {m.n_threads} threads", title_justify="left")
    table.add_column("figure", style="cyan")
    table.add_column("value", justify="right")
    table.add_row("prefill", f"{r['prefill_tok_per_s']:.1f} tok/s ({r['prompt_tokens']} tokens)")
    table.add_row("denoise step: forward", f"{d['forward']['median_ms']:.2f} ms (p90 {d['forward']['p90_ms']:.2f}, "
                  "dg_denoise: logits to the host)")
    table.add_row("  + self-conditioning", f"{d['forward_with_self_conditioning']['median_ms']:.2f} ms")
    table.add_row("  sampler", f"{d['sampler']['median_ms']:.2f} ms")
    share = d["share"]
    table.add_row("  shares", f"forward {share['forward']:.0%}, self-cond {share['self_conditioning']:.0%}, "
                  f"sampler {share['sampler']:.0%}")
    st = r["step"]
    table.add_row("device step (generation)", f"{st['total']['median_ms']:.2f} ms (p90 {st['total']['p90_ms']:.2f})")
    table.add_row("  graph: first / with self-cond", f"{st['graph_first']['median_ms']:.2f} / "
                  f"{st['graph_with_self_conditioning']['median_ms']:.2f} ms")
    table.add_row("  sampler reductions (device, alone)", f"{st['sampler_reductions']['median_ms']:.2f} ms")
    table.add_row("  sampler decisions (host)", f"{st['sampler_decide']['median_ms']:.3f} ms")
    table.add_row("  python", f"{st['python']['median_ms']:.3f} ms")
    sh = st["share"]
    table.add_row("  step shares", f"forward {sh['forward']:.0%}, self-cond {sh['self_conditioning']:.0%}, "
                  f"sampler {sh['sampler']:.0%}, python {sh['python']:.0%}")
    table.add_row("  bytes per step", f"{st['bytes_to_device']:.0f} to the device, {st['bytes_from_device']:.0f} back")
    table.add_row("steps per canvas", ", ".join(map(str, g["steps_per_canvas"])) + (" (fixed)" if g["fixed_steps"] else ""))
    table.add_row("generated", f"{g['generated_tokens']} tokens in {g['seconds']:.2f} s = {g['generated_tok_per_s']:.1f} tok/s")
    table.add_row("tokens per forward", f"{g['tokens_per_forward']:.2f}")
    table.add_row("peak RSS", _human_bytes(r["peak_rss_bytes"]))
    table.add_row("ggml features", " ".join(r["ggml_features"]) or "-")
    _stdout.print(table)
    from .bench import SLOW_CPU_HINT, slow_cpu_build

    if slow_cpu_build(m):
        typer.echo("note: " + SLOW_CPU_HINT, err=True)


@app.command()
def serve(
    model: Optional[str] = typer.Option(None, "--model", "-m", show_default=False,
                                        help=MODEL_HELP + " Default: the bundled demo model."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (loopback unless told otherwise; "
                             "0.0.0.0 for every interface)."),
    port: int = typer.Option(8080, "--port", min=0, max=65535, help="Port to listen on."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="PYDGEMMA_API_KEY", show_default=False,
                                          help="Require 'Authorization: Bearer KEY' on /v1/* (or set PYDGEMMA_API_KEY)."),
    n_ctx: Optional[int] = typer.Option(None, "--n-ctx", min=1, help="Context size in tokens (default: min(4096, "
                                        "the model's)). Prompt plus reply must fit."),
    device: str = typer.Option("auto", "--device", "-d", help="'auto', 'cpu', or a device name (see 'info')."),
    threads: Optional[int] = typer.Option(None, "--threads", "-t", help="CPU threads (default: physical cores)."),
    think: bool = typer.Option(False, "--think", help="Thinking on by default (a request's "
                               "chat_template_kwargs.enable_thinking overrides it)."),
    max_queue: int = typer.Option(16, "--max-queue", min=1, help="Requests that may wait; more get 503 + Retry-After."),
    sc_top_k: int = typer.Option(0, "--sc-top-k", min=0, help="APPROXIMATE self-conditioning over each position's "
                                 "k likeliest tokens (faster; changes the output). 0 = exact."),
    kv_type: str = typer.Option("f16", "--kv-type", help="KV cache entries: f16 (default), f32 (exact), q8_0 "
                                "(half of f16's memory; flash attention). See 'pydgemma info --n-ctx'."),
    offline: bool = typer.Option(False, "--offline", help=OFFLINE_HELP),
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API, with a page at / that shows the canvas settle.

    Endpoints: GET /health, GET /v1/models, POST /v1/chat/completions, POST /v1/completions.
    One generation runs at a time; others wait in order. Streams can carry every denoising step
    ("stream_drafts": true).

    Examples:

      pydgemma serve                                   the demo model on http://127.0.0.1:8080

      pydgemma serve -m model.gguf --port 9000 --api-key secret

      curl http://127.0.0.1:8080/v1/chat/completions -H 'Content-Type: application/json' \\
          -d '{"messages": [{"role": "user", "content": "hi"}]}'
    """
    from .errors import PydgemmaError
    from .run_cli import demo_model_path
    from .server import _require, serve as run_server

    _require()
    from .server.app import ServerConfig

    from .hub import resolve_model

    path = resolve_model(model, offline=_offline(offline)) if model is not None else demo_model_path()
    if not Path(path).is_file():
        raise PydgemmaError(f"no such model file: {path}", "DG_ERR_IO")
    config = ServerConfig(model_path=str(path), n_ctx=n_ctx, device=device, threads=threads, think=think,
                          max_queue=max_queue, api_key=api_key or None, sc_top_k=sc_top_k,
                          kv_type=kv_type)

    def ready(url: str) -> None:
        typer.echo(f"pydgemma serving {Path(path).name} at {url}  (OpenAI API under {url}/v1, page at {url}/)", err=True)

    run_server(config, host=host, port=port, on_ready=ready,
               on_loaded=lambda: typer.echo(f"model loaded: {Path(path).name}; ready", err=True))


@app.command()
def pull(
    model: str = typer.Argument(..., help="org/repo[:QUANT][@revision], e.g. unsloth/diffusiongemma-26B-A4B-it-GGUF:Q4_K_M.",
                                show_default=False),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Download a model from the Hugging Face Hub into its cache and print the local path.

    QUANT picks the GGUF file whose name holds that tag (case-insensitive: Q4_K_M, q8_0, BF16);
    without one, the repository's only model, else its Q4_K_M. A split model is downloaded whole
    and its first part printed. An interrupted download continues where it stopped when the same
    command is run again. HF_TOKEN (or 'hf auth login') is used for gated and private repos;
    HF_ENDPOINT and HF_HUB_CACHE are honoured.

    Examples:

      pydgemma pull unsloth/diffusiongemma-26B-A4B-it-GGUF:Q4_K_M

      pydgemma run -m "$(pydgemma pull unsloth/diffusiongemma-26B-A4B-it-GGUF:Q8_0)" -p "hi"
    """
    from .progress import phase_progress
    from .hub import HubError, fetch, parse_ref

    ref = parse_ref(model)
    if ref is None:
        raise HubError(f"'{model}' is not a Hub reference (org/repo[:QUANT][@revision])")
    with phase_progress(not quiet) as report:
        paths = fetch(ref, offline=False, progress=report)
    typer.echo(str(paths[0]))


@app.command("list")
def list_models(
    json_output: bool = typer.Option(False, "--json", help="Print a JSON array."),
) -> None:
    """List the DiffusionGemma GGUF models in the Hugging Face cache ($HF_HUB_CACHE), with their sizes
    and types. Each can be run by its reference, e.g. 'pydgemma run -m org/repo:Q4_K_M --offline'."""
    from .hub import cache_dir, cached_models

    models = cached_models()
    if json_output:
        typer.echo(json.dumps([m.to_dict() for m in models], indent=2))
        return
    if not models:
        typer.echo(f"no DiffusionGemma models in the Hugging Face cache ({cache_dir()}); get one with "
                   "'pydgemma pull org/repo:QUANT'")
        return
    table = Table(title=f"DiffusionGemma models in {cache_dir()}", title_justify="left")
    for col in ("model", "type", "size", "file", "revision"):
        table.add_column(col, style="cyan" if col == "model" else None, justify="right" if col == "size" else "left")
    for m in models:
        parts = f" ({m.parts_present}/{m.parts} parts)" if m.parts > 1 else ""
        incomplete = " [red]incomplete[/]" if m.parts_present < m.parts else ""
        table.add_row(m.ref, m.file_type or "?", _human_bytes(m.size), m.file + parts + incomplete,
                      ", ".join(m.revisions) or m.commit[:12])
    _stdout.print(table)


def main() -> None:
    """Entry point of the `pydgemma` command."""
    from .cli_runner import run_app

    run_app(app)


if __name__ == "__main__":
    main()
