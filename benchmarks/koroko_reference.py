"""Koroko et al.'s two-level reference outputs, read without torch.

Their repository (``Abdoulaye-Koroko/natural-gradients``) ships the training
curves of its runs as ``.npy`` files of pickled dicts whose arrays are torch
tensors (``apps/mlp_cnn/results_ref/twolevel_kfac/<PROBLEM>/outputs/``). This
reads them with a stub unpickler (torch's legacy storage format: five
pickles, then each storage's element count and raw bytes) and prints each
coarse space's final training loss against K-FAC's, at the end of its run
and at K-FAC's wall-clock (spec ``algorithms.md`` §4.4 names the files:
ones = NICO, span = RESIDU, kryl = KRY-RESIDU, okry = KRY-NICO, eige =
SPECTRAL, dd_ones = PREVIOUS, Tselepidis' coarse matrix; the ``_n_`` files,
where the problem has them, are a second run of the same space whose
setting the repository does not document).

Run: ``python -m benchmarks.koroko_reference PATH/TO/natural-gradients
[--problem MNIST]``.
"""

from __future__ import annotations

import argparse
import io
import pathlib
import pickle

import numpy as np

RUNS = {"kfac": "K-FAC", "kfac_2L_ones": "NICO", "kfac_2L_span": "RESIDU",
        "kfac_2L_span_n_": "RESIDU (_n_)", "kfac_2L_kryl": "KRY-RESIDU",
        "kfac_2L_kryl_n_": "KRY-RESIDU (_n_)", "kfac_2L_okry": "KRY-NICO",
        "kfac_2L_okry_n_": "KRY-NICO (_n_)", "kfac_2L_eige": "SPECTRAL",
        "kfac_2L_dd_ones": "PREVIOUS"}
_DTYPES = {"FloatStorage": np.float32, "DoubleStorage": np.float64,
           "LongStorage": np.int64, "HalfStorage": np.float16}


class _Call:
  """A torch callable met in the pickle: calling it records its arguments."""

  def __init__(self, name):
    self.name = name

  def __call__(self, *args, **kwargs):
    return ("call", self.name, args)


class _Unpickler(pickle.Unpickler):
  def find_class(self, module, name):
    if module.startswith("torch"):
      return _Call(f"{module}.{name}")
    return super().find_class(module, name)

  def persistent_load(self, pid):
    return pid


def _storage(data: bytes):
  """The array of a ``torch.storage._load_from_bytes`` payload."""
  stream = io.BytesIO(data)
  for _ in range(3):                      # magic number, protocol, system info
    _Unpickler(stream).load()
  _, kind, key, *_ = _Unpickler(stream).load()
  arrays = {}
  dtype = np.dtype(_DTYPES[kind.name.rsplit(".", 1)[-1]])
  for k in _Unpickler(stream).load():
    count = int(np.frombuffer(stream.read(8), "<i8")[0])
    arrays[k] = np.frombuffer(stream.read(count * dtype.itemsize), dtype)
  return arrays[key]


def _value(x):
  """A recorded ``_rebuild_tensor_v2`` call as a numpy array; else ``x``."""
  if not (isinstance(x, tuple) and x and x[0] == "call"):
    return x
  storage_call, offset, size, stride = x[2][:4]
  flat = _storage(storage_call[2][0])
  if not size:
    return flat[offset]
  return np.lib.stride_tricks.as_strided(
      flat[offset:], shape=size, strides=[s * flat.itemsize for s in stride]).copy()


def load(path) -> dict:
  """One output file as a dict of numpy arrays and lists."""
  with open(path, "rb") as f:
    np.lib.format.read_magic(f)
    np.lib.format.read_array_header_1_0(f)
    record = _Unpickler(f).load().item()
  return {k: _value(v) for k, v in record.items()}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("repo", help="a checkout of Abdoulaye-Koroko/natural-gradients")
  parser.add_argument("--problem", default="MNIST")
  args = parser.parse_args(argv)
  folder = (pathlib.Path(args.repo) / "apps/mlp_cnn/results_ref/twolevel_kfac"
            / args.problem / "outputs")
  runs = {name: load(folder / f"{f}.npy") for f, name in RUNS.items()
          if (folder / f"{f}.npy").exists()}
  ref = runs["K-FAC"]
  ref_loss, ref_time = float(ref["train_loss"][-1]), float(ref["times"][-1])
  print(f"| {args.problem} | epochs | final train loss | vs K-FAC | time ÷ K-FAC's "
        f"| at K-FAC's {ref_time:.0f} s | vs K-FAC |")
  print("|---|---|---|---|---|---|---|")
  for name, run in runs.items():
    loss, times = np.asarray(run["train_loss"], float), np.asarray(run["times"])
    at = np.interp(ref_time, times, loss) if times[-1] >= ref_time else float("nan")
    print(f"| {name} | {len(times)} | {loss[-1]:.5f} | {loss[-1] / ref_loss - 1:+.1%} "
          f"| {times[-1] / ref_time:.2f} | {at:.5f} | {at / ref_loss - 1:+.1%} |")


if __name__ == "__main__":
  main()
