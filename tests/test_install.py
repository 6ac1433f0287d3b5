"""The package works as an installed wheel, run from a directory outside the checkout: recipes and
assets ship inside it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp / "dist"), str(ROOT)],
                           capture_output=True, text=True)
    if build.returncode != 0:
        pytest.fail(f"building the wheel failed:\n{build.stderr[-2000:]}")
    (wheel,) = (tmp / "dist").glob("m3ae-*.whl")
    target = tmp / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    return target


def _run(site: Path, cwd: Path, *argv: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(site)}
    return subprocess.run([sys.executable, "-m", "m3ae.cli", *argv], cwd=cwd, env=env, check=True,
                          capture_output=True, text=True).stdout


def test_installed_wheel_runs_from_another_directory(installed, tmp_path):
    where = _run(installed, tmp_path, "--version")
    assert where.startswith("m3ae ")
    located = subprocess.run([sys.executable, "-c", "import m3ae; print(m3ae.__file__)"], cwd=tmp_path,
                             env={**os.environ, "PYTHONPATH": str(installed)}, capture_output=True, text=True).stdout
    assert Path(located.strip()).is_relative_to(installed)  # the wheel's copy, not the checkout's
    args = ("pretrain", "--print-config", "--out-dir", "runs/x")
    assert _run(installed, tmp_path, *args) == _run(ROOT / "src", ROOT, *args)
    assert "tiny" in _run(installed, tmp_path, "pretrain", "--help")  # --config lists the packaged recipes
