"""Bit diffusion: the denoiser contract (matched-filter residual, ``denoiser``), training losses
(``loss``), the entropy-rate sigma schedule and sigma grids."""
