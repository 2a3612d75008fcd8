"""The oracle for our runtime's forward pass: transformers' DiffusionGemma, one operation at a time.

``ReferenceSession`` wraps a ``DiffusionGemmaForBlockDiffusion`` and exposes the three operations
of our runtime -- ``prefill``, ``denoise``, ``commit`` -- each made of exactly the calls that
``DiffusionGemmaGenerationMixin.generate`` makes (transformers 5.23,
``models/diffusion_gemma/generation_diffusion_gemma.py``; line numbers below refer to that file)::

    s = ReferenceSession(checkpoint_dir)          # or a loaded model; dtype=torch.float64 for fp64
    s.prefill(prompt_ids)                         # encoder over the prompt -> KV cache
    logits = s.denoise(canvas)                    # [C, vocab] fp32, final (soft-capped) logits
    logits = s.denoise(canvas2, sc_logits=prev)   # prev = previous step's *processed* logits
    s.commit(final_canvas)                        # encoder over the finished canvas -> cache
    s.n_past                                      # prompt + committed canvases

Mirrored calls (batch size 1, no padding, the default ``DynamicCache``):

* cache: ``DynamicCache(config=model.config.get_text_config(decoder=True))``, as
  ``_prepare_cache_for_generation`` (L896-933, L928-931) builds it when ``generate`` gets none
  (L673-678). ``reset()`` makes a new one.
* ``prefill(ids)``: ``encoder_position_ids = arange(n_past, n_past + n)`` (int32, L682-684) and
  an all-True 2-D ``attention_mask`` of length ``n_past + n`` (L694; with ``past_key_values`` given,
  ``cur_len`` includes the cached length, L647-648); then ``_prepare_encoder_inputs`` (L722-731,
  L935-964: ``model.model.encoder.create_masks_for_generate``) and
  ``model.model.encoder(input_ids, attention_mask=mask_mapping, past_key_values, position_ids)``
  (L733-741).
* ``denoise(canvas, sc)``: ``model.model.decoder.create_diffusion_decoder_attention_mask`` with the
  all-True ``decoder_attention_mask`` of length ``n_past + C`` (L695, L991-996), then
  ``model.forward(decoder_input_ids=canvas, self_conditioning_logits=sc, decoder_attention_mask=
  mask_mapping, past_key_values=cache, decoder_position_ids=arange(n_past, n_past + C))``
  (L1029-1036; positions L685-687 / L1121-1124). The decoder never writes the cache
  (``DiffusionGemmaDecoderTextAttention.append_to_cache`` concatenates without storing).
  The returned logits are ``decoder_outputs.logits`` (L1037): after the fp32 cast and the 30.0
  tanh softcap (modeling L1653-1657), before ``logits_processor`` (L1040).
* ``commit(canvas)``: what the next iteration of the canvas loop does: ``input_ids = cat(input_ids,
  argmax_canvas)`` (L793), ``_prepare_kwargs_for_next_canvas`` (L813-821, L1110-1125: encoder
  positions = the canvas's decoder positions, masks grow by C), then the same encoder call as the
  prefill on ``input_ids[:, -C:]`` (L947, L733-741). So ``commit`` *is* ``prefill`` of the canvas.

Semantic facts (transformers 5.23, each checked in ``tests/test_reference.py``):

1. Positions. Prompt token i sits at position i; a canvas at ``n_past .. n_past + C - 1``;
   a committed canvas keeps the positions it was denoised at. ``generate`` passes the positions
   explicitly, but the decoder's own fallback (modeling L1266-1275) uses
   ``cache.get_seq_length(layer_idx=0)``, and layer 0 is a sliding layer: its
   ``DynamicSlidingWindowLayer.get_seq_length`` returns ``cumulative_length`` (cache_utils L273-275)
   = every token seen, not the kept window. With a 40-token prompt and sliding_window 16 it is 40
   while the layer holds 15 keys. Both agree.
2. What a canvas query sees (decoder). Masks are all ``None`` (no padding, dynamic cache: the
   shortcut at modeling L1357-1362) and decoder attention has ``is_causal=False``, so every canvas
   query attends to *every* key it is handed: the cached prefix plus all C canvas keys. Sliding
   layers hold only the last ``sliding_window - 1`` prefix tokens (cache_utils L244-247: 15 for
   window 16), so there a canvas query sees prefix positions ``n_past - (W - 1) .. n_past - 1``
   (all of them if ``n_past < W - 1``), the same set for every canvas position (the window is
   anchored at the canvas start, not per query). Full layers see the whole prefix.
3. The encoder is causal for ``use_bidirectional_attention`` None or "vision" (for text-only input
   "vision" builds the causal masks with an all -1 block overlay: the same mask, materialized);
   sliding layers use ``kv > q - W`` (q sees itself and the W - 1 keys before it). With "all",
   ``DiffusionGemmaTextConfig.__post_init__`` sets ``is_causal=False`` and replaces
   ``sliding_window`` by ``W // 2 + 1`` (16 -> 9; ``to_dict`` writes back ``(W' - 1) * 2``); the
   encoder's masks become bidirectional (full: all cached and new keys; sliding:
   ``|q - kv| <= W'``, i.e. 2W' + 1 = 19 keys) and the cache keeps ``W' - 1`` (8) tokens per sliding
   layer (so a committed canvas cannot see the key at distance W' that a one-shot pass would, and
   the decoder's sliding layers would see 8 prefix tokens). But in transformers 5.23 *no* forward
   runs in this mode: ``merge_with_config_defaults`` (utils/generic.py L1062-1069) puts the
   config's ``is_causal`` into ``kwargs`` and the encoder attention passes ``is_causal=`` again:
   ``TypeError: ...attention_forward() got multiple values for keyword argument 'is_causal'``
   (sdpa and eager alike; ``generate`` too). There is nothing to mirror, so the session refuses it.
4. ``commit`` runs the *encoder* (``model.model.encoder``: ``DiffusionGemmaEncoderTextLayer``, its
   own ``layer_scalar`` buffers, not the decoder's) over the canvas with the causal (sliding) masks
   over cached prefix + canvas, appending its keys/values. In causal modes, prefill(P) + commit(c)
   gives the same cache as prefill(P + c). ``generate`` commits the argmax of the last denoising
   step's processed logits (``argmax_canvas``), not the sampled/renoised canvas; it never commits
   the last canvas, and stops (no commit) when a canvas hits EOS.
5. Self-conditioning (modeling L1253-1262): ``soft = softmax(sc, dtype=float32).to(W.dtype) @ W *
   embed_scale`` with ``W`` the (tied) embedding; the decoder input is
   ``post_norm(embed(canvas) * embed_scale + down(gelu(gate(pre_norm(soft))) * up(pre_norm(soft))))``.
   Without SC, ``soft = 0`` and the MLP (no biases) gives exactly 0, so the input is
   ``post_norm(embed(canvas) * embed_scale)``. ``generate`` passes as ``sc`` the previous step's
   *processed* logits, ``raw / T`` with ``T = t_min + (t_max - t_min) * cur_step / max_steps`` (fp32;
   ``cur_step`` counts down from ``max_denoising_steps``, L315, L758), cast to the embedding dtype
   (L1068-1069); the first step of every canvas has no SC.

Precision: ``dtype=torch.float64`` casts the model (a copy, if a model was passed) and switches the
experts to the eager kernel (``grouped_mm`` has no fp64). The logits are still rounded to fp32
before the softcap (modeling L1654), so fp64 oracle logits carry fp32 rounding (~2e-6 at |30|).
"""

from __future__ import annotations

import copy
import os

import numpy as np

__all__ = ["ReferenceSession"]


class ReferenceSession:
    """One generation's KV cache over a transformers ``DiffusionGemmaForBlockDiffusion`` (batch 1)."""

    def __init__(self, model_or_path, *, dtype=None):
        import torch
        from transformers import DiffusionGemmaForBlockDiffusion

        if isinstance(model_or_path, (str, os.PathLike)):
            model = DiffusionGemmaForBlockDiffusion.from_pretrained(model_or_path).eval()
            if dtype is not None:
                model = model.to(dtype)
        else:
            model = model_or_path
            if dtype is not None and dtype != model.dtype:
                model = copy.deepcopy(model).to(dtype)  # Module.to is in place: leave the caller's model alone
        if getattr(model.config.get_text_config(), "use_bidirectional_attention", None) == "all":
            # transformers 5.23 cannot run this mode at all (fact 3): there is nothing to mirror.
            raise NotImplementedError('use_bidirectional_attention="all" crashes in transformers itself')
        if model.dtype == torch.float64:
            model.set_experts_implementation("eager")  # the default grouped_mm kernel refuses fp64
        self.model = model
        self.reset()

    def reset(self) -> None:
        """Drops the cache (a fresh ``DynamicCache``, as ``generate`` makes)."""
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.model.config.get_text_config(decoder=True))
        self._n_past = 0

    @property
    def n_past(self) -> int:
        """Tokens in the cache: prompt(s) + committed canvases."""
        return self._n_past

    def prefill(self, token_ids) -> None:
        """Causal encoder pass over ``token_ids`` at positions ``n_past ..``, appending to the cache."""
        self._encode(token_ids)

    def commit(self, canvas_ids) -> None:
        """Appends a finished canvas through the encoder, as ``generate`` does before the next canvas."""
        self._encode(canvas_ids)

    def denoise(self, canvas_ids, sc_logits=None) -> np.ndarray:
        """One decoder pass of the canvas over the cached prefix: fp32 logits ``[C, vocab]``.

        ``sc_logits`` (``[C, vocab]``) is what ``generate`` passes as ``self_conditioning_logits``:
        the previous step's processed logits; ``None`` for a canvas's first step.
        """
        import torch

        if self._n_past == 0:
            raise ValueError("denoise needs a prefix in the cache: call prefill first")
        canvas = self._ids(canvas_ids)
        n = canvas.shape[1]
        model, device = self.model, self.model.device
        sc = None
        if sc_logits is not None:
            sc = torch.as_tensor(sc_logits, device=device)
            if tuple(sc.shape) != (n, model.config.text_config.vocab_size):
                raise ValueError(f"sc_logits must be [{n}, vocab], got {tuple(sc.shape)}")
            sc = sc[None].to(model.model.decoder.embed_tokens.weight.dtype)  # L1068-1069
        positions = torch.arange(self._n_past, self._n_past + n, dtype=torch.int32, device=device)[None]
        with torch.no_grad():
            mask_mapping = model.model.decoder.create_diffusion_decoder_attention_mask(
                config=model.config,
                inputs_embeds=canvas.unsqueeze(-1),  # only shape[:2] is read, as in generate
                past_key_values=self.cache,
                decoder_attention_mask=torch.ones((1, self._n_past + n), dtype=torch.bool, device=device),
            )
            out = model.forward(  # generate calls self.forward (no hooks), L714
                decoder_input_ids=canvas,
                self_conditioning_logits=sc,
                decoder_attention_mask=mask_mapping,
                past_key_values=self.cache,
                decoder_position_ids=positions,
            )
        return out.logits[0].to(torch.float32).cpu().numpy()

    # -----------------------------------------------------------------------------------------

    def _ids(self, token_ids):
        import torch

        ids = np.asarray(token_ids)
        if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"expected a non-empty 1-D sequence of token ids, got shape {ids.shape}")
        return torch.as_tensor(ids.astype(np.int64), device=self.model.device)[None]

    def _encode(self, token_ids) -> None:
        import torch

        ids = self._ids(token_ids)
        n = ids.shape[1]
        model, device = self.model, self.model.device
        positions = torch.arange(self._n_past, self._n_past + n, dtype=torch.int32, device=device)[None]
        attention_mask = torch.ones((1, self._n_past + n), dtype=torch.bool, device=device)
        with torch.no_grad():
            input_ids, mask_mapping = model._prepare_encoder_inputs(
                input_ids=ids,
                attention_mask=attention_mask,
                encoder_position_ids=positions,
                past_key_values=self.cache,
                is_prefill=True,  # all of ids is new (generate slices input_ids[:, -C:] instead)
                canvas_length=n,
                batch_size=1,
            )
            model.model.encoder(
                input_ids=input_ids,
                attention_mask=mask_mapping,
                past_key_values=self.cache,
                position_ids=positions,
            )
        self._n_past += n
