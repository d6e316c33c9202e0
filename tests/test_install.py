"""A built wheel carries the configs and the embedded corpus, and a regular (non-editable) install
of it runs ``bitgen data --config demo_cpu`` from outside the source tree.

No network: the wheel is built with ``--no-build-isolation`` (this interpreter's setuptools) and
installed with ``--no-deps`` into a fresh virtualenv whose only extra path is this interpreter's
site-packages (a ``.pth`` line: a plain path entry, so that environment's own ``.pth`` files, such
as an editable bitgen, are not processed and ``import bitgen`` finds the installed wheel).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _run(*argv, cwd: Path, env: dict | None = None) -> str:
    done = subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{argv} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # Build from a copy: an in-tree build leaves build/ and *.egg-info/ in the checkout.
    source = tmp_path_factory.mktemp("src") / "bitgen"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "runs", "cache", "tests"))
    dist = tmp_path_factory.mktemp("dist")
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", dist, source, cwd=source)
    (path,) = dist.glob("bitgen-*.whl")
    return path


@pytest.mark.slow
def test_the_wheel_carries_configs_and_assets(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"bitgen/configs/{p.name}" for p in (REPO / "configs").glob("*.py")}
    assert shipped and shipped <= names
    for asset in (REPO / "bitgen" / "assets").rglob("*"):
        if asset.is_file():
            assert asset.relative_to(REPO).as_posix() in names
    packages = {p.parent.relative_to(REPO).as_posix() for p in (REPO / "bitgen").rglob("__init__.py")}
    assert {f"{p}/__init__.py" for p in packages} <= names


@pytest.mark.slow
def test_a_regular_install_runs_bitgen_data_outside_the_tree(wheel, tmp_path):
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    site = Path(_run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))",
                     cwd=tmp_path).strip())
    (site / "outer_site.pth").write_text(sysconfig.get_path("purelib") + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    _run(python, "-m", "pip", "install", "--no-deps", "--no-index", "-q", wheel, cwd=tmp_path, env=env)

    work = tmp_path / "elsewhere"
    work.mkdir()
    where = _run(python, "-c", "import bitgen; print(bitgen.__file__)", cwd=work, env=env)
    assert Path(where.strip()).is_relative_to(site), where
    out = _run(venv / "bin" / "bitgen", "data", "--config", "demo_cpu", "--no-progress",
               f"data.cache_dir={tmp_path / 'cache'}", cwd=work, env=env)
    assert "rows" in out.lower()
    assert any((tmp_path / "cache").rglob("meta.json"))
