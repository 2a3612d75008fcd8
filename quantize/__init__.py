"""pydgemma.quantize: make DiffusionGemma GGUF files from Hugging Face checkpoints.

Pipeline steps, one module each: `checkpoint` (find and read safetensors lazily), `hf_config`
(hyper-parameters from config.json), `tensor_map` (HF names -> GGUF names and types), `vocab`
(tokenizer -> GGUF metadata), `convert` (the streaming writer), `cli` (`pydgemma-quantize`).
Running a GGUF needs none of this; converting needs `gguf` and `numpy`, never torch.
"""

from .convert import ConversionError, convert

__all__ = ["ConversionError", "convert"]
