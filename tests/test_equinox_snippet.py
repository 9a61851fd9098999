"""The user guide's equinox block runs where equinox is installed (it is
not a dependency: skipped otherwise). It runs after the guide's first
block, which defines the data, ``sample_batch`` and ``key`` it uses, and
asserts that the loss falls; here it also checks that every parameter of
the equinox model has a block."""

import re

import jax
import pytest

from tests.test_guide import GUIDE, _blocks


def test_guide_equinox_block_runs(capsys):
  pytest.importorskip("equinox")
  text = GUIDE.read_text()
  first = _blocks(text)[0]
  (equinox_block,) = re.findall(r"^```py\n(.*?)^```", text, flags=re.S | re.M)
  namespace = {"__name__": "guide"}
  with jax.enable_x64(False):
    exec(compile(first, "guide.md block 1", "exec"), namespace)
    capsys.readouterr()
    exec(compile(equinox_block, "guide.md equinox block", "exec"), namespace)
  out = capsys.readouterr().out
  assert "fallback 0.0%" in out and "Every parameter belongs to a layer" in out, out
  assert "kronecker 10x8" in out and "norm" in out, out   # conv + bias; BatchNorm
