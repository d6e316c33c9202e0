"""Neural network modules (Flax Linen, used only through ``init``/``apply``): reusable transformer
blocks in ``layers`` and the CoBit SDT denoiser in ``sdt``."""
