"""bitgen: generative models over binary token codes (CoBit bitstream diffusion in JAX)."""

__version__ = "0.1.0"
