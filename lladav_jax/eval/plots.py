"""Sweep plots: the task's primary metric against mean NFE and against seconds per sample."""
from __future__ import annotations

from lladav_jax.eval.run import sweep_table


def plot_sweep(sweep: dict, path: str) -> str:
  import matplotlib
  matplotlib.use("Agg")  # headless: eval runs on servers
  import matplotlib.pyplot as plt

  rows = sweep_table(sweep)
  metric, param = sweep["primary_metric"], sweep["sweep"]["param"]
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for ax, xkey, xlabel in ((axes[0], "nfe", "mean NFE per sample"),
                           (axes[1], "seconds_per_sample", "seconds per sample")):
    pts = [(r[xkey], r[metric], r["value"]) for r in rows if r[xkey] is not None and r[metric] is not None]
    if pts:
      xs, ys, labels = zip(*pts)
      ax.plot(xs, ys, "o-")
      for x, y, lab in pts:
        ax.annotate(f"{param}={lab}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(metric)
    ax.grid(True, alpha=0.3)
  fig.suptitle(f"{sweep['task']}: {metric} vs cost, sweeping {param}")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path
