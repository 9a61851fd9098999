"""The benchmark and example entry points run (tiny settings), so they cannot rot."""

import numpy as np
import json

import jax
import jax.numpy as jnp

import kfac_jax_ext as kfe
import pytest

from benchmarks import (adaptive_trace, coarse_model_cost, equal_steps, models, paired_setting,
                        quickstart, step_phases, step_progress, step_time, thread_spin)
from kfac_jax_ext import gram


def test_quickstart_runs(capsys):
  before = kfe.lapack_threads()
  quickstart.main(["--steps", "60", "--batch-size", "16"])
  out = capsys.readouterr().out
  assert "kfe.kfac" in out and "optax.adam" in out
  assert "Adam's final training loss" in out and "kfe.kfac " in out
  # on CPU with OpenBLAS: one thread for the run, the counts restored after it
  assert ("OpenBLAS limited to one thread" in out) == bool(before)
  assert kfe.lapack_threads() == before


def test_step_progress_splits_step_cost_from_per_step_loss(tmp_path, capsys):
  # K-FAC: 100 steps of 0.2 s, loss 100/(k+1); "slow": 50 steps of 0.3 s with
  # twice K-FAC's loss at every step; "fast": its loss is K-FAC's at 2k.
  kfac = [100.0 / (k + 1) for k in range(100)]
  runs = {"kfac": {"run": {"loss": kfac, "step_seconds": [0.2] * 100}},
          "slow": {"run": {"loss": [2 * x for x in kfac[:50]],
                           "step_seconds": [0.3] * 50}},
          "fast": {"run": {"loss": [100.0 / (2 * k + 1) for k in range(100)],
                           "step_seconds": [0.2] * 100}}}
  results = {"task": "t", "name": "toy", "period": 10, "runs": runs}
  slow = step_progress.compare(results, "slow", window=5)
  assert slow["steps"] == (100, 50) and slow["step_cost"] == pytest.approx(1.5)
  assert [k for k, _ in slow["at"]] == [12, 25, 50]       # 25/50/100 % of 50
  assert all(r == pytest.approx(2.0) for _, r in slow["at"])
  assert slow["steps_to_ref"] is None
  assert slow["ordinary_ms"] == pytest.approx((200, 300))
  runs["slow"]["run"]["step_seconds"] = [0.9 if i % 10 == 0 else 0.3 for i in range(50)]
  results["refresh_warmup"] = 3     # steps 0, 1, 2 refresh too
  split = step_progress.compare(results, "slow", window=5)
  assert split["ordinary_ms"][1] == pytest.approx(300)
  assert split["refresh_ms"][1] == pytest.approx(900)   # 0, 10, …, 40 (5) vs 1, 2 (0.3)
  runs["slow"]["run"]["step_seconds"] = [0.3] * 50
  fast = step_progress.compare(results, "fast", window=5)
  assert all(r < 0.6 for _, r in fast["at"])
  # K-FAC's smoothed final (mean of 100/96 … 100/100) is first reached at step 50
  ref_final = sum(100.0 / k for k in range(96, 101)) / 5
  first = next(i for i in range(96) if sum(
      100.0 / (2 * k + 1) for k in range(i, i + 5)) / 5 <= ref_final)
  assert fast["steps_to_ref"] == pytest.approx((first + 5) / 100)
  path = tmp_path / "toy.json"
  path.write_text(json.dumps(results))
  step_progress.main([str(path), "--optimizers", "slow,fast,absent", "--window", "5"])
  out = capsys.readouterr().out
  assert "| toy | slow | 100 / 50 | 1.50 | 200 / 300 | 200 / 300 | 2.000 (k=12)" in out and "absent" not in out
  with pytest.raises(KeyError, match="'none' has no run"):
    step_progress.compare(results, "none")
  with pytest.raises(ValueError, match="fewer than the window"):
    step_progress.compare(results, "slow", window=80)


def test_equal_steps_prints_the_held_model_scales(capsys):
  equal_steps.main(["--task", "mlp", "--quick", "--lr", "0.1", "--damping", "0.1",
                    "--steps", "4", "--refresh-warmup", "0", "--scales",
                    "--optimizer", "two_level_balanced_nicolaides_kronecker"])
  line = [x for x in capsys.readouterr().out.splitlines()
          if x.startswith("held α, γ from step: ")]
  assert len(line) == 1
  steps = [int(part.split(":")[0]) for part in line[0].split("step: ")[1].split(", ")[::2]]
  assert steps[0] == 0                       # the first statistics step's α
  with pytest.raises(SystemExit, match="--scales reads"):
    equal_steps.main(["--task", "mlp", "--quick", "--lr", "0.1", "--damping", "0.1",
                      "--steps", "2", "--refresh-warmup", "0", "--scales"])


def test_equal_steps_compares_schedules_on_the_same_batches(capsys):
  rows = equal_steps.main(["--task", "mlp", "--quick", "--lr", "0.1", "--damping",
                           "0.1", "--steps", "4", "--refresh-warmup", "0,3,0"])
  losses = [loss for _, _, loss, _ in rows]
  assert [w for w, _, _, _ in rows] == [0, 3, 0]
  assert losses[0] == losses[2]      # same batches and keys: the same run
  assert losses[0] != losses[1]      # steps 1 and 2 refreshed: another run
  assert "warm-up 3: train loss after 4 steps" in capsys.readouterr().out


def test_equal_steps_compares_heavy_ball_and_nesterov(capsys):
  rows = equal_steps.main(["--task", "mlp", "--quick", "--lr", "0.1", "--damping",
                           "0.1", "--steps", "4", "--refresh-warmup", "0",
                           "--nesterov", "0,1", "--evals", "2"])
  assert [n for _, n, _, _ in rows] == [False, True]
  assert rows[0][2] != rows[1][2]    # the same batches, another momentum
  out = capsys.readouterr().out
  assert "warm-up 0 nesterov: train loss after 4 steps" in out
  assert "(2: " in out and ", 4: " in out     # the curve at steps 2 and 4
  with pytest.raises(SystemExit):
    equal_steps.main(["--task", "mlp", "--quick", "--lr", "0.1", "--damping", "0.1",
                      "--nesterov", "2"])


def test_time_to_reads_the_window_mean():
  losses = quickstart.np.array([5.0] * 60 + [0.0] * 60)
  clock = quickstart.np.arange(120, dtype=float)
  # the 50-step mean first drops to 2.0 when 30 of its steps are zeros
  assert quickstart.time_to(losses, clock, 2.0) == (90, 89.0)
  assert quickstart.time_to(losses, clock, -1.0) is None


def test_step_phases_runs(capsys):
  step_phases.main(["--model", "mlp", "--batch", "32", "--repeats", "1",
                    "--stats-batch", "8"])
  out = capsys.readouterr().out
  assert "predicted amortized step" in out
  assert out.count("FLOP floor") == 4 and "(from 8 examples)" in out


def test_coarse_model_cost_times_every_piece(capsys):
  coarse_model_cost.main(["--model", "mlp", "--examples", "6", "--repeats", "1"])
  out = capsys.readouterr().out
  assert "S = 4, N = 6" in out
  for piece in ("form B", "lift B", "project B", "form C (per-example)",
                "lift (per-example)", "project (per-example)"):
    assert f"{piece}:" in out


def test_flop_floor_counts_each_phase_once_per_its_period():
  # one 2 -> 3 layer, batch 4: d_a = 3 (bias), d_g = 3
  f = step_phases.phase_flops([2, 3], 4)
  assert f == dict(grad=144, backward_g=0, factors=144, precondition=108,
                   refresh=72, refresh_min=18)
  assert step_phases.flop_floor(f, 1, 1) == pytest.approx(414 / 144)
  assert step_phases.flop_floor(f, 10, 10, 0.5) == pytest.approx(
      (144 + 108 + 0.5 * 144 / 10 + 18 / 10) / 144)
  # the autoencoder at (10, 10): above #22's 1.6x target with the whole
  # batch's statistics, below it with a quarter of the batch
  ae = step_time.MODELS["autoencoder"]
  f = step_phases.phase_flops(ae["sizes"], ae["batch"])
  assert step_phases.flop_floor(f, 10, 10) == pytest.approx(1.641, abs=1e-3)
  assert step_phases.flop_floor(f, 10, 10, 0.25) == pytest.approx(1.565, abs=1e-3)


def test_adaptive_trace_runs_both_model_terms_and_gamma(capsys):
  for flags in ([], ["--model-units"], ["--gamma"]):
    rows = adaptive_trace.main(["--task", "mlp", "--quick", "--steps",
                                "3", "--period", "2"] + flags)
    assert rows.shape == (3, 6) and jnp.isfinite(rows[:, :4]).all()
    # without --gamma the preconditioner got the λ of the update before
    if "--gamma" not in flags:
      assert (rows[1:, 5] == rows[:-1, 1]).all()
    assert rows[0, 5] > 0
  assert capsys.readouterr().out.count("step ") == 3


def test_step_time_runs_without_kfac_jax_or_with_it(capsys):
  step_time.main(["--models", "mlp", "--rounds", "1", "--product-dtype",
                  "bfloat16"])
  out = capsys.readouterr().out
  assert "kfe.make_train_step (10, 10)" in out and "optax.adam" in out
  assert "make_train_step, bfloat16 products (1, 5)" in out


def test_paired_setting_times_both_values_and_restores_the_attribute(capsys):
  paired_setting.main(["kfac_jax_ext.gram.BLOCK", "0,300", "--models", "mlp",
                       "--rounds", "1"])
  out = capsys.readouterr().out
  assert "(1, 5) BLOCK=0" in out and "(10, 10) BLOCK=300" in out
  assert gram.BLOCK == 330
  with pytest.raises(SystemExit):
    paired_setting.main(["kfac_jax_ext.gram.NO_SUCH", "0,1"])


def test_thread_spin_runs(capsys, monkeypatch):
  for variable in step_time.THREAD_ENV:   # only the one set below is printed
    monkeypatch.delenv(variable, raising=False)
  monkeypatch.setenv("OPENBLAS_THREAD_TIMEOUT", "4")   # read by OpenBLAS at load only
  before = kfe.lapack_threads()
  limit = ["--limit-lapack-threads", "1"] if before else []
  medians = thread_spin.main(["--steps", "12"] + limit)
  out = capsys.readouterr().out
  assert "{'OPENBLAS_THREAD_TIMEOUT': '4'}" in out
  assert out.count(" ms") == 3 and "nan" not in out
  assert set(medians) == {"quiet", "between", "refresh"}
  if before:     # limited for the measurement, restored after it
    assert "kfe.limit_lapack_threads(1)" in out and kfe.lapack_threads() == before


def test_3c1f_has_tengrads_wide_dense_layer():
  shapes = jax.eval_shape(models.ConvNet3C1F().init,
                          jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))
  assert shapes["params"]["Dense_0"]["kernel"].shape == (10368, 500)


def test_factored_krylov_nicolaides_step_costs_what_nicolaides_costs():
  """``benchmarks.two_level_flops``: with factored damping the
  Krylov–Nicolaides step's XLA FLOP count is Nicolaides' (its second
  vector is rank one), both above K-FAC's (the per-step token pass)."""
  from benchmarks import tasks, two_level_flops
  task = tasks.make_task("autoencoder", quick=True)
  kfac = two_level_flops.step_flops(task, "kfac")
  nico = two_level_flops.step_flops(task, "multiplicative_nicolaides")
  krylov = two_level_flops.step_flops(task, "multiplicative_krylov_nicolaides")
  for k, n, base in zip(krylov, nico, kfac):
    assert abs(k - n) < 0.01 * n and n > base


def _fake_torch_output(path, losses, times, monkeypatch):
  """A ``.npy`` as Koroko et al.'s scripts write it (a dict whose arrays are
  torch tensors, pickled through torch's legacy storage format), made
  without torch: stand-in ``torch`` modules, for the test's duration."""
  import io
  import pickle
  import sys
  import types

  torch = types.ModuleType("torch")
  utils = types.ModuleType("torch._utils")
  storage_mod = types.ModuleType("torch.storage")
  torch.FloatStorage = type("FloatStorage", (), {"__module__": "torch"})

  def _rebuild_tensor_v2(*args):
    raise AssertionError("only pickled, never called")

  def _load_from_bytes(b):
    raise AssertionError("only pickled, never called")

  _rebuild_tensor_v2.__module__, _load_from_bytes.__module__ = (
      "torch._utils", "torch.storage")
  _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
  _load_from_bytes.__qualname__ = "_load_from_bytes"
  utils._rebuild_tensor_v2, storage_mod._load_from_bytes = (
      _rebuild_tensor_v2, _load_from_bytes)

  for name, module in (("torch", torch), ("torch._utils", utils),
                       ("torch.storage", storage_mod)):
    monkeypatch.setitem(sys.modules, name, module)
  data = np.asarray(losses, np.float32)

  class Root:                       # the storage, by persistent id
    pass

  class Pickler(pickle.Pickler):
    def persistent_id(self, obj):
      return (("storage", torch.FloatStorage, "k0", "cpu", data.size)
              if isinstance(obj, Root) else None)

  stream = io.BytesIO()
  for header in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001}):
    pickle.dump(header, stream, protocol=2)
  Pickler(stream, protocol=2).dump(Root())
  pickle.dump(["k0"], stream, protocol=2)
  stream.write(np.int64(data.size).tobytes() + data.tobytes())

  class Storage:
    def __reduce__(self):
      return _load_from_bytes, (stream.getvalue(),)

  class Tensor:
    def __reduce__(self):
      return _rebuild_tensor_v2, (Storage(), 0, (data.size,), (1,), False, None)

  np.save(path, np.array({"train_loss": Tensor(), "times": list(times)},
                         dtype=object), allow_pickle=True)


def test_koroko_reference_reads_torch_pickled_outputs_without_torch(
    tmp_path, capsys, monkeypatch):
  from benchmarks import koroko_reference
  folder = tmp_path / "apps/mlp_cnn/results_ref/twolevel_kfac/MNIST/outputs"
  folder.mkdir(parents=True)
  _fake_torch_output(folder / "kfac.npy", [0.5, 0.2, 0.1], [1.0, 2.0, 10.0],
                     monkeypatch)
  _fake_torch_output(folder / "kfac_2L_span.npy", [0.5, 0.3, 0.105],
                     [1.0, 4.0, 20.0], monkeypatch)
  run = koroko_reference.load(folder / "kfac_2L_span.npy")
  np.testing.assert_array_equal(run["train_loss"], np.float32([0.5, 0.3, 0.105]))
  koroko_reference.main([str(tmp_path)])
  rows = capsys.readouterr().out.splitlines()
  assert rows[2].startswith("| K-FAC | 3 | 0.10000 | +0.0% | 1.00 |")
  # RESIDU: +5 % at its end (twice K-FAC's time); at K-FAC's 10 s, between
  # its 0.3 at 4 s and 0.105 at 20 s: 0.3 − 0.195·6/16
  assert rows[3].startswith("| RESIDU | 3 | 0.10500 | +5.0% | 2.00 | 0.22688 |")
  assert len(rows) == 4                 # the runs without a file are left out
