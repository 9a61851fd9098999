"""PNG plots of a runner JSON: train and test loss against steps and wall-clock.

Example:
  >>> plots.plot_results(results, "benchmarks/results/autoencoder.png")
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)


def plot_results(results, path):
  """A 2×2 figure (train/test × steps/seconds), one line per optimizer.

  Args:
    results: the runner's results dict.
    path: where to write the PNG.
  """
  fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharey="row")
  runs = {k: v["run"] for k, v in results["runs"].items() if "run" in v}
  for row, split in enumerate(("train", "test")):
    for col, x_key in enumerate(("step", "seconds")):
      ax = axes[row, col]
      for name, run in runs.items():
        evals = run["evals"]
        ax.plot([e[x_key] for e in evals], [e[split]["loss"] for e in evals],
                label=name, marker="." if len(evals) < 60 else None)
      ax.set_xlabel("step" if x_key == "step" else "training wall-clock (s)")
      ax.set_ylabel(f"{split} loss")
      ax.set_yscale("log")
      ax.grid(True, which="both", alpha=0.3)
  axes[0, 0].legend()
  meta = results["meta"]
  fig.suptitle(f"{results['task']}: {results['description']}\n{meta['date']}, "
               f"{meta['machine']}, jax {meta['jax']}", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)
