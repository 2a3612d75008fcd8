"""`pydgemma run`: generate from a prompt, chat interactively, or watch the canvas denoise."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.text import Text

from .errors import PydgemmaError


class CanvasView:
    """A live view of the canvas: accepted tokens bold, still-noisy positions dim, and a status line."""

    def __init__(self, model, console: Console) -> None:
        self.model = model
        self.console = console
        self.live = Live(Text(""), console=console, refresh_per_second=20, transient=False)
        self.started = time.perf_counter()
        self.kept: list[bool] | None = None

    def __enter__(self) -> CanvasView:
        self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.live.__exit__(*exc)

    def on_step(self, ev) -> None:
        if ev.step == 0 or self.kept is None:
            self.kept = [False] * len(ev.argmax)
        self.kept = [k or bool(a) for k, a in zip(self.kept, ev.accepted)]
        body = Text()
        for token, kept in zip(ev.argmax, self.kept):
            piece = self.model.detokenize([int(token)], render_special=True).replace("\n", "⏎")
            body.append(piece, style="bold" if kept else "dim")
        elapsed = time.perf_counter() - self.started
        status = Text(
            f"\ncanvas {ev.canvas + 1}  step {ev.step + 1}  T {ev.temperature:.2f}  mean entropy {ev.mean_entropy:.3f}"
            f"  accepted {sum(self.kept)}/{len(self.kept)}  {elapsed:.1f} s",
            style="cyan",
        )
        self.live.update(body + status, refresh=True)  # every step is drawn, however fast


def run_once(model, prompt: str, options: dict[str, Any], *, visual: bool, as_json: bool, think: bool) -> int:
    out = Console(highlight=False)
    err = Console(stderr=True, highlight=False)
    if visual:
        with CanvasView(model, err) as view:
            gen = model.generate(prompt, think=think, on_step=view.on_step, **options)
    elif as_json:
        gen = model.generate(prompt, think=think, **options)
    else:
        gen = model.generate(prompt, think=think, on_canvas=lambda i, text: (sys.stdout.write(text), sys.stdout.flush()),
                             **options)
        sys.stdout.write("\n")
    if as_json:
        out.print_json(json.dumps(generation_dict(gen)))
    elif visual:
        if gen.thinking:
            out.print(Text(gen.thinking, style="dim italic"))
        out.print(gen.text)
    return 0


def generation_dict(gen) -> dict[str, Any]:
    return {
        "text": gen.text,
        "thinking": gen.thinking,
        "tokens": gen.tokens,
        "steps": gen.steps,
        "n_forwards": gen.n_forwards,
        "tokens_per_forward": gen.tokens_per_forward,
        "hit_eos": gen.hit_eos,
        "seconds": gen.timings.get("total"),
    }


def interactive(model, options: dict[str, Any], *, think: bool, visual: bool, system: str | None) -> int:
    """A chat REPL: each turn reuses the cached conversation; Ctrl-C stops an answer, Ctrl-D quits."""
    err = Console(stderr=True, highlight=False)
    session = model.chat(system=system, think=think, **options)
    err.print(f"[bold]pydgemma chat[/bold] with {Path(model.path).name} — Ctrl-D to quit, Ctrl-C to stop an answer")
    while True:
        try:
            line = input("> ")
        except EOFError:
            sys.stdout.write("\n")
            return 0
        except KeyboardInterrupt:
            sys.stdout.write("\n")
            continue
        if not line.strip():
            continue
        if line.strip() in ("/quit", "/exit"):
            return 0
        try:
            if visual:
                with CanvasView(model, err) as view:
                    gen = session.send(line, on_step=view.on_step)
            else:
                gen = session.send(line, on_canvas=lambda i, text: (sys.stdout.write(text), sys.stdout.flush()))
        except KeyboardInterrupt:
            sys.stdout.write("\n[stopped]\n")
            continue
        except PydgemmaError as exc:
            err.print(f"error: {exc}")
            continue
        if visual:
            sys.stdout.write(gen.text)
        sys.stdout.write("\n")
        sys.stdout.flush()


def demo_model_path() -> Path:
    """The bundled demo model (pydgemma/models/demo/sudoku4-q8_0.gguf)."""
    from .errors import ModelError

    path = Path(__file__).resolve().parent / "models" / "demo" / "sudoku4-q8_0.gguf"
    if not path.is_file():
        try:  # an editable install keeps models/ beside the package
            import pydgemma.models.demo as demo

            path = Path(demo.__file__).resolve().parent / "sudoku4-q8_0.gguf"
        except ImportError:
            pass
    if not path.is_file():
        raise ModelError("the bundled demo model is not installed; give a model with -m", "DG_ERR_IO")
    return path


def run_demo(model, options: dict[str, Any], *, visual: bool, as_json: bool) -> int:
    """Solves a sample 4x4 Sudoku with the demo model and shows it next to the puzzle."""
    from .models.demo import sudoku

    rng_seed = int(options.get("seed") or 0)
    puzzles = sudoku.test_puzzles(50)
    puzzle, _ = puzzles[rng_seed % len(puzzles)]
    prompt = sudoku.prompt_text(puzzle)
    err = Console(stderr=True, highlight=False)
    if visual:
        with CanvasView(model, err) as view:
            gen = model.generate(prompt, on_step=view.on_step, **options)
    else:
        gen = model.generate(prompt, **options)
    solved = sudoku.check_answer(puzzle, gen.text)
    if as_json:
        data = generation_dict(gen)
        data.update({"puzzle": puzzle, "solved": solved})
        Console(highlight=False).print_json(json.dumps(data))
        return 0
    answer = sudoku.parse_answer(gen.text)
    rows_p = puzzle.split(sudoku.SEP)
    rows_a = sudoku.format_grid(answer).split(sudoku.SEP) if answer else ["????"] * 4
    out = Console(highlight=False)
    out.print("[bold]puzzle[/bold]     [bold]answer[/bold]")
    for rp, ra in zip(rows_p, rows_a):
        out.print(" ".join(rp) + "    " + " ".join(ra))
    verdict = "[green]solved[/green]" if solved else "[red]not solved[/red]"
    out.print(f"{verdict} in {sum(gen.steps)} denoising steps ({gen.tokens_per_forward:.1f} tokens per forward pass)")
    return 0
