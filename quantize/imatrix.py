"""Importance matrices ("imatrix") from diffusion activations, in llama.cpp's imatrix GGUF format.

`collect` runs real generations over a calibration text with the native loop (prefill of the
prompt, every denoising step of every canvas, the commits between canvases) while the native
collector (`dg_context_imatrix_*`) sums, for every weight matrix, the squared activations entering
each input channel and counts the rows; MoE experts get per-expert sums and counts over the
(token, slot) pairs routed to them.

The calibration text is tokenized as a whole (no BOS) and cut into chunks of `chunk_size` tokens;
the first token of every chunk is replaced by BOS, as llama-imatrix does, and each chunk is the
prompt of one generation of `max_new_tokens` tokens (seed `seed + chunk index`). A trailing
partial chunk is dropped.

The file format (llama.cpp's imatrix GGUF: `write_imatrix`, `read_imatrix`, `importance`) is in
imatrix_file.py, which the quantizer reads without this runtime tool.
"""

from __future__ import annotations

import os
from typing import Callable

from .convert import ConversionError
from .imatrix_file import Imatrix, importance, read_imatrix, write_imatrix  # noqa: F401 - the file format

# The output head's entry: llama-imatrix collects it only with --process-output, and never for a
# head tied to the token embedding; we collect it under the tied name when asked to.
HEAD_NAMES = ("output.weight", "token_embd.weight")

ChunkProgress = Callable[[int, int], None]  # (chunks done, chunks in all)


def calibration_chunks(model, text: str, chunk_size: int, n_chunks: int | None = None) -> list[list[int]]:
    """The prompts of `collect`: chunks of `chunk_size` tokens of `text`, each starting with BOS."""
    if chunk_size < 2:
        raise ConversionError(f"--chunk-size must be at least 2, got {chunk_size}")
    tokens = model.tokenize(text, add_special=False, parse_special=False)
    bos = model.tokenize("", add_special=True, parse_special=False)
    available = len(tokens) // chunk_size
    if available == 0:
        raise ConversionError(f"the calibration text has {len(tokens)} tokens, fewer than one chunk of {chunk_size} "
                              "(give more text or a smaller --chunk-size)")
    count = available if n_chunks is None or n_chunks <= 0 else min(n_chunks, available)
    chunks = []
    for i in range(count):
        chunk = tokens[i * chunk_size:(i + 1) * chunk_size]
        if bos:
            chunk[0] = bos[0]
        chunks.append(chunk)
    return chunks


def collect(
    model_path: str | os.PathLike[str],
    text: str,
    *,
    chunks: int | None = None,
    chunk_size: int = 512,
    max_new_tokens: int = 256,
    seed: int = 0,
    max_steps: int | None = None,
    process_output: bool = False,
    dataset: str | None = None,
    device: str = "auto",
    n_threads: int | None = None,
    progress: ChunkProgress | None = None,
) -> Imatrix:
    """Collects an importance matrix over generations prompted by the chunks of `text`."""
    from pydgemma import Model
    from pydgemma.generate import generate_ids

    if max_new_tokens < 1:
        raise ConversionError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    with Model(model_path, device=device, n_threads=n_threads) as model:
        prompts = calibration_chunks(model, text, chunk_size, chunks)
        canvas = model.hparams["canvas_length"]
        n_ctx = chunk_size + -(-max_new_tokens // canvas) * canvas
        if n_ctx > model.hparams["n_ctx_train"]:
            raise ConversionError(f"a chunk of {chunk_size} tokens and {max_new_tokens} new tokens need {n_ctx} positions; "
                                  f"the model has {model.hparams['n_ctx_train']}")
        # F32 KV entries: the activations collected are the model's, not rounded through an F16 cache
        ctx = model.context(n_ctx=n_ctx, n_batch=chunk_size, n_threads=n_threads, kv_type="f32")
        try:
            ctx.imatrix_start()
            if progress:
                progress(0, len(prompts))
            for i, prompt in enumerate(prompts):
                ctx.reset()
                generate_ids(ctx, prompt, max_new_tokens=max_new_tokens,
                             sampler={"seed": seed + i, "max_steps": max_steps})
                if progress:
                    progress(i + 1, len(prompts))
            ctx.imatrix_stop()
            entries = ctx.imatrix()
        finally:
            ctx.close()
    if not process_output:
        entries = {k: v for k, v in entries.items() if k not in HEAD_NAMES}
    return Imatrix(entries, [dataset] if dataset else [], len(prompts), chunk_size)
