"""A real two-process run over loopback (gloo CPU collectives): train, checkpoint, resume."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TINY = [
    "model.seq_tokens=16", "model.embed_dim=32", "model.n_heads=2", "model.n_blocks=1",
    "model.dim_ff=64", "model.content_dim=8", "model.head_hidden=16", "data.batch_size=8",
    "train.ckpt_every=2", "train.log_every=1", "train.sample_every=0", "optim.warmup_steps=2",
    "mesh.data=2", "mesh.fsdp=2",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_pair(run_dir: Path, steps: int, resume: bool) -> None:
    port = free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    procs = []
    try:
        for pid in range(2):
            cmd = [sys.executable, "-m", "bitgen.cli", "train", "--config", "demo_cpu", *TINY,
                   f"train.steps={steps}", "--run-dir", str(run_dir), "--no-progress",
                   "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(pid)]
            if resume:
                cmd.append("--resume")
            procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))
        outputs = [p.communicate(timeout=420)[0] for p in procs]
        for p, out in zip(procs, outputs):
            assert p.returncode == 0, out[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.mark.slow
def test_two_processes_train_checkpoint_and_resume(tmp_path):
    launch_pair(tmp_path, steps=4, resume=False)
    step_dir = tmp_path / "checkpoints" / "4"
    assert (step_dir / "data" / "process_0-of-2.json").exists()
    assert (step_dir / "data" / "process_1-of-2.json").exists()
    launch_pair(tmp_path, steps=6, resume=True)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 5, 6]
    assert all(r["loss"] == r["loss"] for r in lines)  # finite, not NaN
