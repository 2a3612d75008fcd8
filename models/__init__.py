"""Hugging Face-side helpers for DiffusionGemma, installed as ``pydgemma.models``.

``tiny_checkpoint`` builds tiny random DiffusionGemma checkpoints in ``save_pretrained`` form
(weights, config, generation config, tokenizer, chat template) for tests. ``registry`` names the known
shapes (the real 26B-A4B, "mid", "tiny"); ``synthetic`` writes random but valid GGUF files of them in
any quant mix. Nothing heavy (torch, transformers) is imported until a submodule is imported.
"""
