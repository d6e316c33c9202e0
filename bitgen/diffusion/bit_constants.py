"""Constants fixed by the bit representation (bits in {0, 1}), defined once for every module.

* ``DATA_CENTER`` = ½, the midpoint of {0, 1}: the matched filter's decision threshold
  ((x − ½)/σ² is the log-likelihood ratio of b = 1 vs b = 0), the centre the SDT subtracts from
  its inputs, and the mean of the sampler's prior x_T = ½ + σ_0·ε.
* ``SIGMA_DATA`` = ½, the standard deviation of a fair bit: the SDT's input scale
  c_in = 1/sqrt(σ² + σ_data²) and the EDM loss weight 1/σ² + 1/σ_data².

The reference reads both from ``cfg.diffusion.continuous`` and every CoBit config sets them to
these values; ``DiffusionConfig.data_center`` / ``sigma_data`` are kept so existing config files
load, and must equal these (``bitgen.config.check_bit_constants``). This module
imports nothing, so the network (``bitgen.nn``) and the diffusion code can both read it.
"""

DATA_CENTER = 0.5
SIGMA_DATA = 0.5
