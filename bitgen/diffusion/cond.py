"""What a denoiser and a sampler may condition on: ``Cond`` (DESIGN "Conditioning is part of the
contract").

* Clamped bits (prompt, infill, the context of a block): ``clamp_mask`` bool [B,S] (True = the bit
  is known) and ``clamp_bits`` [B,S] its clean value in {0,1}. Samplers hold a clamped bit at its
  clean value in every state x (no noise: a known bit stays clean at every σ), set its denoised
  value D to the bit, and so return it unchanged in the final bits. The self-conditioning
  estimate starts at zeros (no estimate) for every bit, as without ``cond``; from the second step
  on it is the clamped D.
* ``embedding`` [B, ...]: context for a network that takes one, or None.
* ``guidance``: classifier-free guidance scale w (scalar or [B]) over the clamped bits, or None.
  ``bitgen.diffusion.denoiser.guided_denoise`` applies it to the network residual only (w = 1:
  the conditional model, w = 0: the unconditional one); samplers built with ``guided=True`` call
  it. ``guidance_noise`` [B,S] standard normal: ε of the clamped bits in the unconditional
  branch, which sees them noised (bit + σ·ε) as rows with dropped conditioning are in training;
  the samplers fill it from their initial noise when it is None.

``cond=None`` everywhere means the unconditional model, bit for bit. A ``Cond`` is a pytree: pass
it to jitted functions as an ordinary argument (its arrays are traced, so new prompts reuse the
compiled program; which fields are None is part of the program).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from bitgen.errors import BitgenError


class CondError(BitgenError, ValueError):
    """A conditioning input whose shapes or fields do not fit the batch."""


@struct.dataclass
class Cond:
    """Conditioning of one batch; every field is optional (None = not conditioned on it)."""

    clamp_mask: jax.Array | None = None  # bool [B,S]: True = known bit
    clamp_bits: jax.Array | None = None  # [B,S] clean values in {0,1} (read where clamp_mask)
    embedding: jax.Array | None = None  # [B, ...] context for a network that takes one
    guidance: jax.Array | None = None  # CFG scale, scalar or [B]
    guidance_noise: jax.Array | None = None  # [B,S] ε of clamped bits in the unconditional branch

    @classmethod
    def clamped(cls, mask, bits, **fields) -> Cond:
        """``Cond`` that clamps ``bits`` [B,S] where ``mask`` [B,S] is True."""
        mask, bits = jnp.asarray(mask, bool), jnp.asarray(bits)
        if mask.shape != bits.shape or mask.ndim != 2:
            raise CondError(f"clamp_mask {mask.shape} and clamp_bits {bits.shape} must both be "
                            "[batch, bits]; build them from the same prompt layout")
        return cls(clamp_mask=mask, clamp_bits=bits, **fields)

    def clamp(self, values: jax.Array) -> jax.Array:
        """``values`` [B,S] with every clamped bit replaced by its clean value (same dtype).

        Without a mask the input is returned unchanged (the same array, no operation).
        """
        if self.clamp_mask is None:
            return values
        if self.clamp_bits is None or self.clamp_mask.shape != values.shape:
            raise CondError(f"clamp_mask {self.clamp_mask.shape} must match the state "
                            f"{values.shape} and come with clamp_bits; use Cond.clamped(mask, bits)")
        return jnp.where(self.clamp_mask, self.clamp_bits.astype(values.dtype), values)
