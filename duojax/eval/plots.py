"""Figures: the length x depth heatmap per method, and perplexity per position band."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")  # files only; never needs a display
  import matplotlib.pyplot as plt
  return plt


def heatmaps(summary: dict, path: str | Path, title: str = "", metric_label: str = "score",
             methods: list[str] | None = None, panel_size: float = 2.6) -> Path:
  """One panel per method: x = context length, y = needle depth, colour = score in [0, 1].

  summary: grid.summarize's output ({method: {"lengths", "depths", "grid" [depth][length]}}).
  """
  plt = _pyplot()
  names = methods or list(summary)
  fig, axes = plt.subplots(1, len(names), figsize=(panel_size * len(names) + 0.8, panel_size + 0.5),
                           squeeze=False, constrained_layout=True)
  im = None
  for ax, name in zip(axes[0], names):
    s = summary[name]
    grid = np.array([[np.nan if v is None else v for v in row] for row in s["grid"]], float)
    im = ax.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto", origin="upper")
    ax.set_title(f"{name}\nmean {s['mean']:.2f}", fontsize=8)
    ax.set_xticks(range(len(s["lengths"])))
    ax.set_xticklabels([_k(l) for l in s["lengths"]], fontsize=7)
    step = max(1, len(s["depths"]) // 5)
    ax.set_yticks(range(0, len(s["depths"]), step))
    ax.set_yticklabels([f"{d:.0%}" for d in s["depths"][::step]], fontsize=7)
    ax.set_xlabel("context tokens", fontsize=7)
  axes[0][0].set_ylabel("needle depth", fontsize=7)
  if im is not None:
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label=metric_label)
  if title:
    fig.suptitle(title, fontsize=9)
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return path


def ppl_bands(ppl: dict, path: str | Path, title: str = "") -> Path:
  """Perplexity per position band, one line per method (ppl.evaluate's output)."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(4.8, 3.0), constrained_layout=True)
  for name, r in ppl["results"].items():
    mids = [(b["from"] + b["to"]) / 2 for b in r["bands"]]
    ax.plot(mids, [b["ppl"] for b in r["bands"]], marker="o", ms=3, label=name)
  ax.set_xlabel("token position")
  ax.set_ylabel("perplexity")
  ax.legend(fontsize=7)
  ax.set_title(title or f"perplexity by position ({ppl['length']} tokens)", fontsize=9)
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return path


def _k(n: int) -> str:
  return f"{n / 1000:g}K" if n >= 1000 else str(n)
