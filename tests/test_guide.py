"""The user guide's code runs: ``docs/guide.md``'s python blocks, in order,
in one namespace (later sections reuse the data and loss of earlier ones),
with x64 off as a user has it. Each block asserts what it shows."""

import pathlib
import re

import jax

GUIDE = pathlib.Path(__file__).resolve().parents[1] / "docs" / "guide.md"


def _blocks(text):
  return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_the_guide_has_code_for_each_topic():
  text = GUIDE.read_text()
  for topic in ("BatchNorm", "Dropout", "nnx.split", "has_aux=True",
                "describe_layers", "due_at", "example_batch"):
    assert topic in "".join(_blocks(text)), topic


def test_guide_code_blocks_run_in_order(capsys):
  namespace = {"__name__": "guide"}
  with jax.enable_x64(False):
    for i, code in enumerate(_blocks(GUIDE.read_text())):
      exec(compile(code, f"{GUIDE.name} block {i + 1}", "exec"), namespace)
  out = capsys.readouterr().out
  assert "scale_and_shift" in out          # BatchNorm's affine: a diagonal block


README = GUIDE.parents[1] / "README.md"


def test_readme_training_loop_runs():
  """The front page's loop, then its plain-optax lines, in one namespace."""
  namespace = {"__name__": "readme"}
  blocks = _blocks(README.read_text())
  assert len(blocks) == 2 and "make_train_step" in blocks[0]
  with jax.enable_x64(False):
    for i, code in enumerate(blocks):
      exec(compile(code, f"README.md block {i + 1}", "exec"), namespace)
      if i == 0:   # 50 K-FAC steps on a 10-class problem: well below log(10)
        assert float(namespace["loss"]) < 0.6 * 2.303, float(namespace["loss"])
