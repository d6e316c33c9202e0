"""``bitgen bench``: throughput against the hardware limit, sampler overhead and head memory.

One process, one run, four measurements and an opt-in fifth (see docs/benchmarks.md for the
formulas and a report):

1. **matmul limit**: achieved FLOP/s of an n×n·n×n matmul in the compute dtype (the peak the other
   numbers are divided by; on an accelerator it stands in for the datasheet peak, so the train
   fraction is an MFU against *achievable* peak).
2. **train step**: the real sharded ``bitgen.train.step`` (AdamW, EMA, entropy schedule,
   self-conditioning, dropout) per trunk size: step time (median after warm-up; compile reported
   separately), tokens/s, analytic model FLOPs per step and their rate as a fraction of (1),
   re-measured between the steps so both see the same machine load.
3. **sampler**: the full compiled sampler on the default grid vs ``model_calls`` × one bare
   jitted denoiser call at the same batch: the overhead ratio, samples/s and tokens/s.
4. **heads**: the SDT bit head + binary loss vs a token-softmax head + cross-entropy on the same
   trunk output, forward + backward: XLA's compiled memory (arguments + outputs + temporaries)
   and time, for several (T, V).
5. **generation** (``--generation``): generated tokens/s of every generator of
   ``generation.GENERATORS`` (AR with KV cache, CoBit 256 NFE, BitLM with and without guidance)
   at one shared backbone size, batch 1 and 64, beside the analytic cost model of spec §A.6
   (passes and model FLOPs per generated token, ``gen_cost``) and the achieved FLOP/s.

Timings use ``jax.block_until_ready``; everything is jitted with static shapes. Programs that are
compared are timed round-robin (``time_interleaved``) so a shared machine's drifting load hits
both sides of every ratio alike.

Modules: ``timing`` (machine, interleaved timing, compiled memory, matmul limit), ``flops`` (the
analytic FLOP model), ``programs`` (trunks, train-step and sampler benchmarks), ``heads`` (the
head comparison), ``gen_cost`` (the generation cost model), ``generation`` (the generator table
and its timing), ``report`` (the whole run, targets, summary table), ``cli`` (flags).
"""
