"""Hugging Face-side helpers for DiffusionGemma, installed as ``pydgemma.models``.

``tiny_checkpoint`` builds tiny random DiffusionGemma checkpoints in ``save_pretrained`` form
(weights, config, generation config, tokenizer, chat template) for tests. Nothing heavy
(torch, transformers) is imported until a submodule is imported.
"""
