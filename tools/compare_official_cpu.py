"""CPU train-step speed: bitgen's jitted CoBit-S step vs the official PyTorch model, interleaved.

Usage: python tools/compare_official_cpu.py --official PATH [--batch 4] [--reps 3] [--out JSON]

PATH is a checkout of the official CoBit code (the directory holding ``models/sdt.py``); it is
imported, never copied. Four programs are timed round-robin (A B C D A B C D ...; one warm-up
round excluded; median of ``--reps``) on the same cores, each in its runtime's own worker process
(``--processes shared``: all four in one):

- ``bitgen``: the real jitted, sharded, donated train step (``bitgen bench --train cobit-s:B``),
  self-conditioning pass included (p = 0.5: the bootstrap forward runs over the whole batch);
- ``official_sc`` / ``official_nosc``: the official ``SequenceVDTContinuousModel`` at the same
  sizes in float32 eager mode, one train step with and without its self-conditioning bootstrap
  pass: forward, EDM-weighted binary_sm loss on sigmoid(f + matched filter), backward,
  global-norm clip 1.0, AdamW (β = 0.9/0.99, wd 0.01) and an EMA update, as bitgen's step does;
- ``matmul``: the chain of 2048² matmuls of ``bitgen.bench.timing`` sized to bitgen's step FLOPs.

Processes: in one process the two runtimes share glibc's heap, and torch's allocations between
bitgen's steps cost bitgen about 20,000 page faults per step (none when it runs alone); two
workers keep each heap to its runtime. Both apply ``bitgen.host_memory.keep_freed_host_memory``.

Threads: both runtimes size their pools from the CPU affinity mask. On a shared, oversubscribed
box PyTorch eager stalls at every op's thread barrier, so run it pinned (``taskset -c 1 python
tools/compare_official_cpu.py ...``: one thread each); see docs/benchmarks.md.

Model FLOPs are ``bitgen.bench.flops.train_step_flops`` for every program: 4 passes with the SC
pass, 3 without; dropout 0.1 everywhere. Needs torch (CPU) and the official code's imports
(``ml_collections`` is replaced by a stand-in when absent: the model only reads attributes).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing
import os
import resource
import statistics
import sys
import time
import types
from pathlib import Path

import jax
import numpy as np

from bitgen.bench.flops import train_step_flops
from bitgen.bench.programs import train_step_program, trunk_config
from bitgen.bench.timing import backend_info, load_average, matmul_program
from bitgen.config import DiffusionConfig, ModelConfig
from bitgen.host_memory import keep_freed_host_memory

MATMUL_SIZE = 2048


class _Attrs(dict):
    """Attribute-access dict: the part of ``ml_collections.ConfigDict`` the official model uses."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None  # getattr(cfg, key, default) falls back


def _official_model_class(path: Path):
    """Import ``SequenceVDTContinuousModel`` from the official checkout at ``path``."""
    try:
        import ml_collections  # noqa: F401
    except ImportError:
        stand_in = types.ModuleType("ml_collections")
        stand_in.config_dict = types.SimpleNamespace(ConfigDict=_Attrs)
        sys.modules["ml_collections"] = stand_in
    # The file alone: the package's __init__ imports trainers and wrappers the model does not need.
    spec = importlib.util.spec_from_file_location("official_sdt", path / "models" / "sdt.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SequenceVDTContinuousModel


def official_config(cfg: ModelConfig) -> _Attrs:
    """The official config keys (LM1B CoBit-S ablation layout) describing bitgen's ``cfg``."""
    model = _Attrs(
        self_condition=True, center_inputs=True, patch_size=cfg.patch_size,
        embed_dim=cfg.embed_dim, dim_ff=cfg.dim_ff, n_blocks=cfg.n_blocks, n_heads=cfg.n_heads,
        head_type="optimal_skip_mlp", out_dim=1, head_hidden=cfg.head_hidden,
        dropout=cfg.dropout, content_dim_discrete=cfg.content_dim,
        content_dim_continuous=cfg.content_dim, use_rope_trunk=True, rope_base=cfg.rope_base,
        abs_pos_mode="local_only", n_fourier_global=cfg.n_fourier_global,
        n_fourier_local=cfg.n_fourier_local, use_adaln=True, rpb_max_distance=1,
        use_swiglu=True, scale_by_sigma=False, use_flash_attn=False,
        continuous_logit_scaling="none")
    diffusion = _Attrs(continuous=_Attrs(sigma_data=0.5, data_center=0.5))
    data = _Attrs(representation="binary", vocab_size=0, bits_per_token=cfg.patch_size)
    return _Attrs(framework="continuous_score", model=model, diffusion=diffusion, data=data)


def official_step(model_class, cfg: ModelConfig, bits: np.ndarray, *, self_condition: bool):
    """A zero-argument callable running one eager float32 train step of the official model."""
    import torch

    torch.manual_seed(0)
    model = model_class(official_config(cfg)).train()
    params = [p for p in model.parameters() if p.requires_grad]
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01)
    target = torch.as_tensor(bits, dtype=torch.float32)
    diffusion = DiffusionConfig()
    sigma_data2 = diffusion.sigma_data**2

    def step() -> float:
        sigma = torch.exp(diffusion.p_mean + diffusion.p_std * torch.randn(target.shape[0]))
        x_t = target + sigma[:, None] * torch.randn_like(target)
        sigma2 = sigma.square()
        matched = ((x_t - 0.5) / sigma2.clamp_min(1e-12)[:, None]).clamp(-30.0, 30.0)
        x0_hat = torch.zeros_like(x_t)
        if self_condition:
            with torch.no_grad():
                first = torch.sigmoid(model(x_t, sigma, None).squeeze(-1) + matched)
            chosen = torch.rand(target.shape[0]) < diffusion.self_condition_prob
            x0_hat = torch.where(chosen[:, None], first, x0_hat)
        logits = model(x_t, sigma, x0_hat).squeeze(-1) + matched
        weight = (sigma2 + sigma_data2) / (sigma2 * sigma_data2)
        loss = (weight[:, None] * (torch.sigmoid(logits) - target).square()).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_lerp_(ema, params, 1.0 - 0.9999)
        return float(loss.detach())

    return step


def _compiled_callable(program):
    """A zero-argument callable running a ``bitgen.bench.timing.Program`` once (fed back)."""
    compiled = program.jitted.lower(*program.args).compile()
    state = {"args": program.args}

    def run() -> None:
        out = jax.block_until_ready(compiled(*state["args"]))
        if program.feed_back is not None:
            state["args"] = program.feed_back(out)

    return run


def _build(kind: str, job: dict, bits: np.ndarray | None) -> tuple[dict, dict]:
    """The programs of one runtime: ``("jax", ...)`` bitgen's step and the matmul chain,
    ``("torch", ...)`` the official step with and without SC. Returns (callables, facts)."""
    cfg = trunk_config(job["trunk"], dtype="float32")
    if kind == "torch":
        import torch

        model_class = _official_model_class(Path(job["official"]))
        programs = {name: official_step(model_class, cfg, bits, self_condition=sc)
                    for name, sc in (("official_sc", True), ("official_nosc", False))}
        return programs, {"torch_version": torch.__version__,
                          "torch_threads": torch.get_num_threads()}
    program, flops = train_step_program(cfg, job["batch"])
    chain = max(1, round(flops / (2.0 * MATMUL_SIZE**3)))
    start = time.perf_counter()
    programs = {"bitgen": _compiled_callable(program)}
    facts = {"bitgen_compile_s": time.perf_counter() - start, "bitgen_flops": flops,
             "matmul_chain": chain, "bits": np.asarray(program.args[1]["bits"]),
             "machine": backend_info()}
    programs["matmul"] = _compiled_callable(matmul_program(MATMUL_SIZE, "float32", chain))
    return programs, facts


def _timed(run) -> tuple[float, int]:
    """Wall seconds and minor page faults (of this process) of one call."""
    faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    run()
    return time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before


def _serve(conn, kinds: list[str]) -> None:
    """A worker process: receive the job, build the programs of ``kinds``, then run the one each
    request names and answer with its time and page faults, until a request of None."""
    keep_freed_host_memory()  # as the bitgen command does; torch allocates through glibc too
    job = conn.recv()
    programs, facts, bits = {}, {}, job.get("bits")
    for kind in kinds:
        built, kind_facts = _build(kind, job, bits)
        bits = kind_facts.get("bits", bits)
        programs.update(built)
        facts.update(kind_facts)
    conn.send({"programs": list(programs), **facts})
    while (name := conn.recv()) is not None:
        conn.send(_timed(programs[name]))


def _answer(conn, worker):
    """The worker's next message; a worker that died ends the run naming it and its exit code
    (its traceback is above, on stderr)."""
    try:
        return conn.recv()
    except EOFError:
        worker.join(timeout=30)
        raise SystemExit(f"the {worker.name} worker process stopped (exit code {worker.exitcode}); "
                         "its error is printed above") from None


def compare(official: Path, batch: int, reps: int, trunk: str = "cobit-s",
            processes: str = "separate", warmup: int = 1) -> dict:
    """Build, time and summarise the four programs (see the module docstring).

    processes: "separate" runs JAX and torch in two worker processes, "shared" in one. Either
    way one program runs at a time, round-robin: A B C D A B C D ...
    """
    if not (official / "models" / "sdt.py").is_file():
        raise SystemExit(f"--official {official}: no models/sdt.py there; pass the official checkout")
    cfg = trunk_config(trunk, dtype="float32")  # an unknown trunk fails here, before any worker
    job = {"official": str(official), "batch": batch, "trunk": trunk}
    groups = [["jax", "torch"]] if processes == "shared" else [["jax"], ["torch"]]
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: JAX does not fork
    owner, facts, workers = {}, {}, []
    try:
        for kinds in groups:  # built one after the other: compiling does not share the cores
            conn, child = context.Pipe()
            worker = context.Process(target=_serve, args=(child, kinds), daemon=True,
                                     name="+".join(kinds))
            worker.start()
            child.close()  # a worker that dies then ends the parent's recv with EOFError
            workers.append((worker, conn))
            # The official step trains on bitgen's batch: the JAX worker is built first.
            conn.send({**job, "bits": facts.get("bits")})
            ready = _answer(conn, worker)
            owner.update({name: (conn, worker) for name in ready.pop("programs")})
            facts.update(ready)
        order = ["bitgen", "official_sc", "official_nosc", "matmul"]
        load_before = load_average()
        samples = {name: [] for name in order}
        for round_index in range(warmup + reps):
            for name in order:
                conn, worker = owner[name]
                conn.send(name)
                seconds, faults = _answer(conn, worker)
                if round_index >= warmup:
                    samples[name].append((seconds, faults))
        load_after = load_average()
    finally:
        for worker, conn in workers:
            try:
                conn.send(None)
            except OSError:  # the worker has gone already
                pass
            worker.join(timeout=30)
    flops = {"bitgen": facts["bitgen_flops"],
             "official_sc": train_step_flops(cfg, batch, self_conditioning=True),
             "official_nosc": train_step_flops(cfg, batch, self_conditioning=False),
             "matmul": facts["matmul_chain"] * 2.0 * MATMUL_SIZE**3}
    tokens = batch * cfg.seq_tokens
    rows = {}
    for name, timed in samples.items():
        median = statistics.median(seconds for seconds, _ in timed)
        rows[name] = {"median_s": median, "times_s": [round(seconds, 4) for seconds, _ in timed],
                      "page_faults": [faults for _, faults in timed],
                      "flops_per_step": flops[name], "flops_per_s": flops[name] / median,
                      "tokens_per_s": tokens / median if name != "matmul" else None}
    bitgen_rate, chain_rate = rows["bitgen"]["flops_per_s"], rows["matmul"]["flops_per_s"]
    return {
        "machine": facts["machine"], "torch_version": facts["torch_version"],
        "torch_threads": facts["torch_threads"], "processes": processes,
        "cpu_affinity": len(os.sched_getaffinity(0)),
        "load_average_before_after": [load_before, load_after],
        "trunk": trunk, "batch": batch, "seq_tokens": cfg.seq_tokens, "patch_size": cfg.patch_size,
        "reps": reps, "bitgen_compile_s": facts["bitgen_compile_s"],
        "matmul_chain": facts["matmul_chain"], "programs": rows,
        "ratio_vs_official_nosc": bitgen_rate / rows["official_nosc"]["flops_per_s"],
        "ratio_vs_official_sc": bitgen_rate / rows["official_sc"]["flops_per_s"],
        "fraction_of_matmul_chain": bitgen_rate / chain_rate,
    }


def summary(report: dict) -> str:
    """A Markdown table of the report."""
    lines = ["| program | s/step | tokens/s | GFLOP/step | GFLOP/s | page faults/step |",
             "|---|---|---|---|---|---|"]
    for name, row in report["programs"].items():
        tokens = "" if row["tokens_per_s"] is None else f"{row['tokens_per_s']:.1f}"
        lines.append(f"| {name} | {row['median_s']:.3f} | {tokens} | "
                     f"{row['flops_per_step'] / 1e9:.1f} | {row['flops_per_s'] / 1e9:.1f} | "
                     f"{int(statistics.median(row['page_faults'])):,} |")
    lines.append(f"\nbitgen / official (no SC) FLOP/s: {report['ratio_vs_official_nosc']:.2f}x; "
                 f"bitgen / official (SC) FLOP/s: {report['ratio_vs_official_sc']:.2f}x; "
                 f"bitgen / matmul chain: {report['fraction_of_matmul_chain']:.1%}")
    lines.append(f"threads: torch {report['torch_threads']}, CPUs in affinity "
                 f"{report['cpu_affinity']}, XLA_FLAGS={report['machine']['xla_flags']!r}, "
                 f"host malloc {report['machine']['host_malloc']}, JAX and torch in "
                 f"{'one process' if report['processes'] == 'shared' else 'two processes'}; "
                 f"load average before/after {report['load_average_before_after']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", type=Path, required=True,
                        help="official CoBit checkout (holds models/sdt.py)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--trunk", default="cobit-s", help="named trunk of bitgen.bench.programs")
    parser.add_argument("--reps", type=int, default=3, help="timed rounds (median)")
    parser.add_argument("--out", type=Path, help="write the JSON report here")
    parser.add_argument("--processes", choices=("separate", "shared"), default="separate",
                        help="JAX and torch in two worker processes (default) or in one")
    args = parser.parse_args(argv)
    report = compare(args.official.resolve(), args.batch, args.reps, args.trunk, args.processes)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    print(summary(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
