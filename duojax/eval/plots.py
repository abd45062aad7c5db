"""Figures: the length x depth heatmap per method, perplexity per position band, and
head patterns side by side."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _save(fig, path: str | Path) -> Path:
  import matplotlib.pyplot as plt
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return path


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
  return _save(fig, path)


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
  return _save(fig, path)


def _k(n: int) -> str:
  return f"{n / 1000:g}K" if n >= 1000 else str(n)


def pattern_maps(maps: dict, path: str | Path, marks: dict | None = None, title: str = "",
                 titles: dict | None = None, panel_size: float = 1.5) -> Path:
  """One small panel per pattern, side by side: y = layer, x = KV head, colour = score.

  maps: {name: [L, Hkv] array in [0, 1]} (gates or scores); marks: {name: [L, Hkv]
  bool}, the heads drawn with a dot (e.g. the retrieval heads at one sparsity);
  titles: {name: panel title} (default the name).
  """
  plt = _pyplot()
  names = list(maps)
  first = np.asarray(maps[names[0]])
  height = min(6.0, max(2.5, 0.12 * first.shape[0] + 1.0))
  fig, axes = plt.subplots(1, len(names), figsize=(panel_size * len(names) + 0.8, height),
                           squeeze=False, constrained_layout=True)
  im = None
  for ax, name in zip(axes[0], names):
    a = np.asarray(maps[name], float)
    im = ax.imshow(a, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto", origin="upper",
                   interpolation="nearest")
    if marks and name in marks:
      ys, xs = np.nonzero(np.asarray(marks[name]))
      ax.scatter(xs, ys, s=6, c="red", marker="o", linewidths=0)
    ax.set_title((titles or {}).get(name, name), fontsize=7)
    ax.set_xticks(range(a.shape[1]))
    ax.set_xticklabels(range(a.shape[1]), fontsize=6)
    step = max(1, a.shape[0] // 10)
    ax.set_yticks(range(0, a.shape[0], step))
    ax.set_yticklabels(range(0, a.shape[0], step), fontsize=6)
    ax.set_xlabel("KV head", fontsize=7)
  axes[0][0].set_ylabel("layer", fontsize=7)
  if im is not None:
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
  if title:
    fig.suptitle(title, fontsize=8)
  return _save(fig, path)
