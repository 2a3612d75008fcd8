"""What one denoising step sends to the device, by hand: the canvas, its positions, the uniforms
and the temperature (12 bytes a position + 4), and the KV cache's inputs: the slot of each position
for the full and the sliding layers (8 bytes a position), one mask row per layer kind (4 bytes a
slot of the full layers' view and of the sliding ring), and with the matmul attention path (V
stored transposed) the place of every V value of the canvas (4 bytes each)."""

from __future__ import annotations


def step_bytes_to_device(model, info: dict, n_past: int) -> int:
    """`info`: the context's (Context.info)."""
    C = model.hparams["canvas_length"]
    view_full = min(info["kv_slots_full"], -(-(n_past + C) // 1024) * 1024)
    total = 12 * C + 4 + 8 * C + 4 * (view_full + info["kv_slots_swa"])
    if not info["flash_attn"]:
        rows = {l.is_sliding: l.head_dim * l.n_head_kv for l in model.layers}
        total += 4 * C * sum(rows.values())
    return total
