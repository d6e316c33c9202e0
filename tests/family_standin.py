"""A minimal model family for the registry tests: i.i.d. tokens from one learned logit vector.

It is registered only inside tests (``monkeypatch.setitem(bitgen.families._MODULES, ...)``) and
shows that a family is one module plus one registry entry: train, sample and eval run it
without any other change.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from bitgen.families.base import Task
from bitgen.textcodec import DecodedText
from bitgen.train.step import StepFns


class Unigram:
    name = "unigram"
    options = None
    sweeps_sampler = False

    def check(self, cfg, text) -> None:
        """Any vocabulary works."""

    def task(self, cfg, vocab_size):
        def loss(params, ids, cond, key):
            return -jnp.mean(jax.nn.log_softmax(params["logits"])[ids]), ({}, {})

        return Task(self.name, init_params=lambda key: {"logits": jnp.zeros((vocab_size,), jnp.float32)},
                    param_axes={"logits": PartitionSpec(None)}, init_schedule=lambda: None,
                    step_fns=StepFns(input_key="ids", loss=loss))

    @staticmethod
    def _draw(params, key, batch: int, seq_tokens: int):
        return jax.random.categorical(key, params["logits"], shape=(batch, seq_tokens))

    def draw(self, model, sampler_cfg, *, temperature, top_p):
        return lambda params, key, batch: self._draw(params, key, batch, model.cfg.model.seq_tokens)

    def decode(self, out, text):
        return [(DecodedText(text.decode_ids(ids), tuple(int(i) for i in ids), 0), "")
                for ids in np.asarray(out)]

    def settings(self, sampler_cfg, *, options, temperature, top_p):
        return {"task": self.name}

    def training_samples(self, cfg, state, rows, key, n):
        return np.asarray(self._draw(state.ema_params, key, n, cfg.model.seq_tokens)), self.name

    def after_step(self, cfg, state, run_dir, done) -> None:
        """Nothing to write."""


FAMILY = Unigram()
