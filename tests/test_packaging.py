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


def test_the_house_rules_hold():
  """No library file over 400 lines; no transform imports another."""
  library = ROOT / "kfac_jax_ext"
  long_files = {str(p.relative_to(library)): n for p in library.rglob("*.py")
                if (n := len(p.read_text().splitlines())) > 400}
  assert not long_files, long_files
  transforms = {p.stem for p in library.glob("*_transform.py")}
  assert {"kfac_transform", "tengrad_transform", "two_level_transform"} <= transforms
  crossing = {}
  for name in transforms:
    text = (library / f"{name}.py").read_text()
    imported = {t for t in transforms - {name}
                if f"import {t}" in text or f"kfac_jax_ext.{t} import" in text}
    if imported:
      crossing[name] = sorted(imported)
  assert not crossing, crossing
