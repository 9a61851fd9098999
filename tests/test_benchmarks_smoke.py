"""The benchmark and example entry points run (tiny settings), so they cannot rot."""

from benchmarks import compare_kronecker, quickstart, step_phases, step_time


def test_quickstart_runs(capsys):
  quickstart.main(["--steps", "3", "--batch-size", "16"])
  out = capsys.readouterr().out
  assert "kfe.kfac" in out and "optax.adam" in out


def test_step_phases_runs(capsys):
  step_phases.main(["--model", "mlp", "--batch", "32", "--repeats", "1"])
  assert "predicted amortized step" in capsys.readouterr().out


def test_step_time_runs_without_kfac_jax_or_with_it(capsys):
  step_time.main(["--models", "mlp", "--rounds", "1"])
  out = capsys.readouterr().out
  assert "kfe.kfac (stats 10, inv 10)" in out and "optax.adam" in out


def test_compare_kronecker_runs(capsys):
  compare_kronecker.main(["--task", "fashion_cnn", "--steps", "12", "--sweep-steps", "2"])
  out = capsys.readouterr().out
  assert "skipped" in out or ("tkfac" in out and "kfac" in out)
