"""Packaging and lint: only ``kfac_jax_ext`` is installed, the benchmark
scripts run from the repository root, and ``ruff check`` passes."""

import importlib.metadata
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_only_the_library_is_installed(tmp_path):
  dist = importlib.metadata.distribution("kfac_jax_ext")
  assert dist.read_text("top_level.txt").split() == ["kfac_jax_ext"]
  assert dist.metadata["Version"] and dist.metadata.get_all("Classifier")
  outside = subprocess.run(
      [sys.executable, "-c", "import benchmarks"], cwd=tmp_path,
      capture_output=True, text=True)
  assert outside.returncode != 0 and "No module named 'benchmarks'" in outside.stderr
  inside = subprocess.run([sys.executable, "-m", "benchmarks.run", "--help"],
                          cwd=ROOT, capture_output=True, text=True)
  assert inside.returncode == 0 and "--optimizers" in inside.stdout, inside.stderr


def test_ruff_is_clean():
  out = subprocess.run([sys.executable, "-m", "ruff", "check", str(ROOT)],
                       cwd=ROOT, capture_output=True, text=True)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-1000:]
