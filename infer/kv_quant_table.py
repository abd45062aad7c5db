"""Accuracy of the quantised KV cache: one table from `duojax.eval` runs per --kv-dtype.

  for kv in bf16 int8 int4; do
    python -m duojax.eval niah --attention full,duo --sparsity 0.5 --lengths 2000,4000 \\
        --depths 0.25,0.5,0.75 --kv-dtype $kv --out OUT/niah_$kv.json
  done
  python -m infer.kv_quant_table OUT            # -> OUT/table.md, OUT/summary.json, OUT/kv_quant.png

Reads OUT/{task}_{kv}.json for every task and kv dtype present, prints a Markdown table
(method x kv dtype: each task's scores, overall and per length, with the KV cache bytes of
the longest length from `duojax.cache.kv_cache_bytes`, scales included) and plots the
scores per kv dtype.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

KV_ORDER = ("bf16", "fp32", "int8", "k8v4", "int4")


def load(folder: Path) -> dict:
  """{(task, kv_dtype): eval document} for OUT/{task}_{kv}.json."""
  docs = {}
  for p in sorted(folder.glob("*_*.json")):
    m = re.fullmatch(r"(niah|mkniah|passkey)_(bf16|fp32|int8|int4|k8v4)\.json", p.name)
    if m:
      docs[m.group(1), m.group(2)] = json.loads(p.read_text())
  return docs


def kv_mib(doc: dict, method: dict, kv: str) -> float | None:
  """The cache of one prompt at the run's longest length, as the eval allocated it."""
  from duojax import cache as kvc
  from duojax.checkpoint import store
  from duojax.pattern import load_any
  try:
    config = store.load_config(Path(doc["settings"]["ckpt"]))
  except Exception:  # noqa: BLE001 - the checkpoint is not on this machine: leave it out
    return None
  if method["kind"] not in ("full", "duo"):
    return None  # (streaming / random masks are rebuilt elsewhere; not in this comparison)
  mask = None
  if method["kind"] == "duo":
    pat = load_any(doc["settings"]["pattern"])
    mask = pat.with_settings(sink=method["sink"], recent=method["recent"]).binarize(
        sparsity=method["sparsity"])
  n = max(doc["settings"]["lengths"])
  return kvc.kv_cache_bytes(config, mask, n, kv_dtype=kv) / 2 ** 20


def summarise(docs: dict) -> list[dict]:
  rows = []
  tasks = sorted({t for t, _ in docs})
  kvs = [k for k in KV_ORDER if any(kk == k for _, kk in docs)]
  for kv in kvs:
    first = next(docs[t, kv] for t in tasks if (t, kv) in docs)
    for method in first["methods"]:
      row = {"method": method["name"], "kv_dtype": kv,
             "kv_MiB": kv_mib(first, method, kv), "lengths": first["settings"]["lengths"]}
      for t in tasks:
        if (t, kv) not in docs:
          continue
        d = docs[t, kv]
        s = d["summary"][d["plot_metric"]].get(method["name"])
        if s is None:
          continue
        row[t] = {"metric": d["plot_metric"], "mean": s["mean"], "by_length": s["by_length"],
                  "seconds": d.get("seconds", {}).get("per_method", {}).get(method["name"])}
      rows.append(row)
  return rows


def markdown(rows: list[dict]) -> str:
  tasks = sorted({k for r in rows for k in r if k in ("niah", "mkniah", "passkey")})
  lengths = rows[0]["lengths"]
  head = ["method", "KV dtype", f"KV cache @{max(lengths)} (MiB)"]
  for t in tasks:
    metric = next(r[t]["metric"] for r in rows if t in r).replace("_", " ")
    head += [f"{t} {metric} %"] + [f"{t} @{n}" for n in lengths]
  out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    cells = [r["method"], r["kv_dtype"], "-" if r["kv_MiB"] is None else f"{r['kv_MiB']:.2f}"]
    for t in tasks:
      if t not in r:
        cells += ["-"] * (1 + len(lengths))
        continue
      cells += [f"{100 * r[t]['mean']:.1f}"] + [f"{100 * r[t]['by_length'][str(n)]:.0f}"
                                                for n in lengths]
    out.append("| " + " | ".join(cells) + " |")
  return "\n".join(out)


def plot(rows: list[dict], path: Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  tasks = sorted({k for r in rows for k in r if k in ("niah", "mkniah", "passkey")})
  methods = list(dict.fromkeys(r["method"] for r in rows))
  kvs = list(dict.fromkeys(r["kv_dtype"] for r in rows))
  fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.2), squeeze=False)
  width = 0.8 / len(kvs)
  for ax, t in zip(axes[0], tasks):
    for i, kv in enumerate(kvs):
      ys = [next((100 * r[t]["mean"] for r in rows if r["method"] == m and r["kv_dtype"] == kv
                  and t in r), 0) for m in methods]
      ax.bar([j + i * width for j in range(len(methods))], ys, width, label=kv)
    ax.set_xticks([j + width * (len(kvs) - 1) / 2 for j in range(len(methods))], methods)
    ax.set_ylim(0, 105)
    ax.set_title(t)
    ax.set_ylabel("score %")
  axes[0][-1].legend(title="KV cache", fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(prog="python -m infer.kv_quant_table", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("folder", help="folder of {niah,mkniah,passkey}_{bf16,int8,int4}.json")
  a = ap.parse_args(argv)
  folder = Path(a.folder)
  docs = load(folder)
  if not docs:
    raise SystemExit(f"no {{task}}_{{kv}}.json eval results in {folder}")
  rows = summarise(docs)
  table = markdown(rows)
  print(table)
  (folder / "summary.json").write_text(json.dumps(rows, indent=1))
  (folder / "table.md").write_text(table + "\n")
  plot(rows, folder / "kv_quant.png")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
