"""Train the demo model: a tiny DiffusionGemma that completes 4x4 Sudoku puzzles.

    python -m pydgemma.models.demo.train --out DIR [--steps N] [--minutes 15]

Why Sudoku: every output cell is constrained by its row, its column and its 2x2 box, i.e. by
cells both before and after it in reading order. That is the bidirectional constraint solving a
diffusion model does in parallel (it fills the cells it is sure of first, anywhere on the canvas,
and those then pin down the rest), and that left-to-right decoding does badly: an autoregressive
model must commit to the first cell before it has "looked at" the clues that decide it.

Task format (every character below is a single token of the tiny tokenizer):

* puzzle: 4 rows of 4 cells, digits ``1``-``4`` for clues and ``.`` for blanks, rows separated by
  ``/``, e.g. ``..23/3214/2.31/.342`` -> the user message is ``"Solve: " + puzzle``, rendered
  with the Gemma-4-style chat template of ``tiny_checkpoint`` (thinking off), so the prompt ends
  in ``<|turn>model\\n<|channel>thought\\n<channel|>``;
* answer: the 16 digits with the same separators (19 tokens), then ``<turn|>``; the canvas has
  ``CANVAS_LENGTH`` = 24 positions and the positions after the end token are trained to
  ``<turn|>`` as well (the runtime cuts at the first end-of-generation token).

Puzzles are made on the fly from all 288 valid 4x4 grids with 4-10 random blanks, keeping only
puzzles with a unique solution. A fixed seeded set of ``N_TEST`` puzzles is held out (never
trained on) and used to evaluate the converted GGUF with pydgemma's native runtime.

Objective: uniform-state block diffusion, as DiffusionGemma's sampler generates. The clean prompt
goes through the encoder; each canvas token is replaced by a uniform random vocabulary token with
probability t ~ U(0, 1) (one t per example); cross-entropy on every canvas position. On half of
the batches a first no-grad pass gives logits that are fed back, divided by a temperature drawn
from the sampler's range [t_min, t_max], as self-conditioning logits for the trained pass.

After training: save the HF checkpoint (with tokenizer and generation config), convert it to an
F32 GGUF, quantize that to Q8_0, evaluate both with ``pydgemma.Model(...).generate`` on the
held-out puzzles and write ``DIR/metrics.json``.

This module imports neither torch nor transformers at import time: the puzzle helpers
(``make_puzzle``, ``test_puzzles``, ``prompt_text``, ``parse_answer``, ``check_answer``) are used
by the tests without them.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

# The task (puzzles, prompt and answer formats, the check) lives in sudoku.py, which the runtime
# imports without this recipe; its names stay available here.
from .sudoku import (BLANK, CANVAS_LENGTH, N_TEST, SEP, __all__, all_grids, answer_text, check_answer,  # noqa: F401
                     format_grid, is_valid_grid, make_puzzle, parse_answer, prompt_text, solutions, test_puzzles)

TRAIN_SEED = 0
TOKENIZER_VOCAB = 512
MAX_POSITIONS = 512

GENERATION = {
    "max_denoising_steps": 16,
    "t_min": 0.4,
    "t_max": 0.8,
    "entropy_bound": 0.1,
    "stability_threshold": 1,
    "confidence_threshold": 0.005,
}


# ---------------------------------------------------------------------------------------------
# Model and training (torch imported inside)
# ---------------------------------------------------------------------------------------------


def model_spec():
    from ..tiny_checkpoint import TinySpec

    return TinySpec(
        tokenizer_vocab_size=TOKENIZER_VOCAB,
        hidden_size=128,
        num_hidden_layers=4,
        layer_types=("sliding_attention", "sliding_attention", "sliding_attention", "full_attention"),
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        global_head_dim=64,
        num_global_key_value_heads=1,
        intermediate_size=256,
        moe_intermediate_size=128,
        num_experts=4,
        top_k_experts=2,
        sliding_window=128,  # > prompt + canvas: every layer sees the whole puzzle
        canvas_length=CANVAS_LENGTH,
        max_position_embeddings=MAX_POSITIONS,
        seed=TRAIN_SEED,
    )


def build_tokenizer():
    """tiny_checkpoint's tokenizer, after checking that the task's characters are single tokens."""
    from ..tiny_checkpoint import build_tokenizer as tiny_tokenizer

    tok = tiny_tokenizer(TOKENIZER_VOCAB, model_max_length=MAX_POSITIONS)
    for ch in "1234" + BLANK + SEP:
        ids = tok.encode(ch, add_special_tokens=False)
        if len(ids) != 1 or tok.decode(ids) != ch:
            raise RuntimeError(f"{ch!r} is not a single round-tripping token: {ids}")
    sample = format_grid(list(all_grids()[5][:8]) + [0] * 8)
    ids = tok.encode(sample, add_special_tokens=False)
    if len(ids) != len(sample) or tok.decode(ids) != sample:
        raise RuntimeError(f"{sample!r} does not tokenize one token per character")
    return tok


def prompt_ids(tok, puzzle: str) -> list[int]:
    text = tok.apply_chat_template([{"role": "user", "content": prompt_text(puzzle)}], tokenize=False,
                                   add_generation_prompt=True)
    return tok.encode(text, add_special_tokens=False)


def canvas_target(tok, solution: str) -> list[int]:
    end = tok.convert_tokens_to_ids("<turn|>")
    ids = tok.encode(answer_text(solution), add_special_tokens=False) + [end]
    return ids + [end] * (CANVAS_LENGTH - len(ids))


def _generation_config(tok):
    from ..tiny_checkpoint import _generation_config as generation_config

    return generation_config(tok, GENERATION)


def train(out: Path, *, steps: int, minutes: float, batch_size: int = 64, lr: float = 1e-3, warmup: int = 50,
          sc_prob: float = 0.5, log_every: int = 25) -> dict:
    import torch
    from transformers import DiffusionGemmaForBlockDiffusion

    from ..tiny_checkpoint import _restyle_config_json, build_config

    torch.set_num_threads(2)
    torch.manual_seed(TRAIN_SEED)
    rng = random.Random(TRAIN_SEED)
    g = torch.Generator().manual_seed(TRAIN_SEED)

    tok = build_tokenizer()
    spec = model_spec()
    config = build_config(spec, tok)
    model = DiffusionGemmaForBlockDiffusion(config)  # transformers' default init, seeded above
    model.set_experts_implementation("eager")
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    vocab = config.text_config.vocab_size

    held_out = {p for p, _ in test_puzzles()}
    # The template around the puzzle is constant and every puzzle character is one token.
    probe = test_puzzles(1)[0][0]
    full = prompt_ids(tok, probe)
    char_id = {ch: tok.convert_tokens_to_ids(ch) for ch in "1234" + BLANK + SEP}
    n_pre = len(full) - len(probe) - next(
        i for i in range(len(full)) if full[len(full) - 1 - i] == char_id[probe[-1]])
    pre, post = full[:n_pre], full[n_pre + len(probe):]

    def fast_prompt(puzzle: str) -> list[int]:
        return pre + [char_id[ch] for ch in puzzle] + post

    for p, _ in test_puzzles(20):
        assert fast_prompt(p) == prompt_ids(tok, p), p
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))))

    def batch():
        prompts, targets = [], []
        while len(prompts) < batch_size:
            p, s = make_puzzle(rng)
            if p in held_out:
                continue
            prompts.append(fast_prompt(p))
            targets.append(canvas_target(tok, s))
        return torch.tensor(prompts), torch.tensor(targets)

    curve: list[dict] = []
    t0 = time.time()
    deadline = t0 + minutes * 60
    acc_loss, acc_n, step = 0.0, 0, 0
    for step in range(steps):
        if time.time() > deadline:
            print(f"time budget reached after {step} steps", flush=True)
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        prompt, target = batch()
        t = torch.rand(batch_size, 1, generator=g)
        noise = torch.rand(batch_size, CANVAS_LENGTH, generator=g) < t
        noisy = torch.where(noise, torch.randint(0, vocab, target.shape, generator=g), target)
        sc_logits = None
        if torch.rand(1, generator=g).item() < sc_prob:
            with torch.no_grad():
                first = model(input_ids=prompt, decoder_input_ids=noisy).logits
            temp = torch.empty(batch_size, 1, 1).uniform_(GENERATION["t_min"], GENERATION["t_max"], generator=g)
            sc_logits = first / temp
        logits = model(input_ids=prompt, decoder_input_ids=noisy, self_conditioning_logits=sc_logits).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), target.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        acc_loss += loss.item()
        acc_n += 1
        if (step + 1) % log_every == 0:
            entry = {"step": step + 1, "loss": acc_loss / acc_n, "lr": lr_at(step), "elapsed_s": time.time() - t0}
            curve.append(entry)
            print(f"step {entry['step']:5d}  loss {entry['loss']:.4f}  lr {entry['lr']:.2e}  "
                  f"{entry['elapsed_s']:.0f}s", flush=True)
            acc_loss, acc_n = 0.0, 0
    else:
        step = steps
    train_s = time.time() - t0

    model.eval()
    hf = out / "hf"
    model.generation_config = _generation_config(tok)
    model.save_pretrained(hf, safe_serialization=True)
    _restyle_config_json(hf / "config.json", spec)
    tok.save_pretrained(hf)
    return {
        "steps_done": step,
        "steps_planned": steps,
        "train_wall_s": round(train_s, 1),
        "batch_size": batch_size,
        "lr": lr,
        "warmup": warmup,
        "self_conditioning_prob": sc_prob,
        "n_params": n_params,
        "vocab_size": vocab,
        "spec": {k: v for k, v in spec.__dict__.items() if not k.startswith("vision")},
        "loss_curve": curve,
    }


def evaluate(gguf: Path, n: int = N_TEST, **options) -> dict:
    """Exact-solve accuracy of ``gguf`` on the first ``n`` held-out puzzles (seed i for puzzle i)."""
    import pydgemma

    solved, steps, forwards, failures, per_puzzle = 0, 0, 0, [], []
    t0 = time.time()
    with pydgemma.Model(str(gguf)) as m:
        for i, (puzzle, _sol) in enumerate(test_puzzles(n)):
            gen = m.generate(prompt_text(puzzle), max_new_tokens=CANVAS_LENGTH, seed=i, **options)
            ok = check_answer(puzzle, gen.text)
            solved += ok
            per_puzzle.append("1" if ok else "0")
            steps += sum(gen.steps)
            forwards += gen.n_forwards
            if not ok and len(failures) < 5:
                failures.append({"puzzle": puzzle, "answer": gen.text})
    return {
        "n": n,
        "exact_solve": solved / n,
        "avg_steps_per_canvas": steps / n,
        "avg_forwards": forwards / n,
        "wall_s": round(time.time() - t0, 1),
        "solved": "".join(per_puzzle),  # puzzle i (seed i) solved?
        "failures": failures,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--steps", type=int, default=1600, help="planned optimizer steps (cosine schedule length)")
    ap.add_argument("--minutes", type=float, default=13.5, help="wall-time cap for the training loop")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    args = ap.parse_args(argv)

    from ...quantize import convert
    from ...quantize.quantize import quantize

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    metrics = train(out, steps=args.steps, minutes=args.minutes, batch_size=args.batch_size, lr=args.lr)
    f32 = out / "sudoku4-f32.gguf"
    q8 = out / "sudoku4-q8_0.gguf"
    convert(out / "hf", f32, out_type="f32", overwrite=True)
    quantize(f32, q8, mix="Q8_0", overwrite=True)
    metrics["generation"] = GENERATION
    metrics["gguf_bytes"] = {"f32": f32.stat().st_size, "q8_0": q8.stat().st_size}

    # The runtime must see the same prompt tokens as training did.
    import pydgemma

    tok = build_tokenizer()
    with pydgemma.Model(str(q8)) as m:
        p = test_puzzles(1)[0][0]
        runtime_ids = list(m.chat_prompt_ids([{"role": "user", "content": prompt_text(p)}]))
        metrics["prompt_ids_match"] = runtime_ids == prompt_ids(tok, p)

    metrics["eval_q8_0"] = evaluate(q8)
    metrics["eval_f32"] = evaluate(f32)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    c = metrics["loss_curve"]
    print(f"trained {metrics['steps_done']} steps in {metrics['train_wall_s']}s; "
          f"loss {c[0]['loss']:.3f} -> {c[-1]['loss']:.3f}" if c else "")
    for kind in ("f32", "q8_0"):
        e = metrics[f"eval_{kind}"]
        print(f"{kind}: exact-solve {e['exact_solve']:.1%} on {e['n']} held-out puzzles, "
              f"{e['avg_steps_per_canvas']:.2f} steps/canvas ({e['wall_s']}s)")
    print(f"prompt ids match runtime: {metrics['prompt_ids_match']}; q8_0 size {metrics['gguf_bytes']['q8_0']} B")
    return 0


if __name__ == "__main__":
    sys.exit(main())
