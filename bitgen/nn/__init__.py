"""Neural network modules (Flax Linen, used only through ``init``/``apply``): the one attention
(masks, RoPE, KV cache) in ``attention``, reusable blocks in ``layers``, the CoBit SDT denoiser in
``sdt``, the AR transformer in ``ar``, GPT-2 in ``gpt2`` and the shared windowed NLL in ``nll``."""
