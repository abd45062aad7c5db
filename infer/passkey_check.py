"""A first accuracy check of a head pattern: numeric passkeys in long contexts,
answered with full attention and with DuoAttention on the same prompts.

  python -m infer.passkey_check [--ckpt smollm2-135m] [--pattern DIR] --haystack DIR \
      [--length 4000] [--depths 5] [--sparsity 0.5] [--out check.json]
"""

from __future__ import annotations

import argparse
import json
import time


from duojax.data.haystack import HaystackTokens, load_haystack
from duojax.data.niah import build_passkey_prompt, contains_answer, depth_grid
from duojax.engine import generate
from duojax.model import llama
from duojax.serving import load_model, make_mask


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--ckpt", default=None)
  ap.add_argument("--pattern", default=None)
  ap.add_argument("--haystack", required=True)
  ap.add_argument("--length", type=int, default=4000)
  ap.add_argument("--depths", type=int, default=5)
  ap.add_argument("--sparsity", type=float, default=0.5)
  ap.add_argument("--out", default=None)
  a = ap.parse_args(argv)
  m = load_model(a.ckpt, "full", pack=False)  # runs from m.params (the dict) per kind
  from duojax.pattern import load_any
  from duojax.checkpoint import store
  pat = load_any(a.pattern) if a.pattern else load_any(store.default_pattern_dir(m.ckpt))
  hay = HaystackTokens(load_haystack(a.haystack), m.tokenizer, line_breaks=False)
  prompts, answers = [], []
  for i, d in enumerate(depth_grid(a.depths)):
    ids, key = build_passkey_prompt(hay, m.tokenizer, a.length, d, seed=i, offset=0)
    prompts.append([int(x) for x in ids])
    answers.append(key)
  rows = {}
  for kind in ("full", "duo", "streaming"):
    mask = make_mask(m.config, kind, pat, sparsity=a.sparsity)
    params = llama.apply_head_mask(m.params, mask) if mask is not None else m.params
    t = time.perf_counter()
    r = generate(params, m.config, prompts, 12, mask, prefill_chunk=1024)
    outs = [m.tokenizer.decode(x, skip_special_tokens=True) for x in r.tokens]
    rows[kind] = {"outputs": outs, "correct": [contains_answer(o, k) for o, k in zip(outs, answers)],
                  "seconds": round(time.perf_counter() - t, 2), "kv_cache_bytes": r.kv_cache_bytes}
    print(f"{kind:9s} {sum(rows[kind]['correct'])}/{len(answers)} right  "
          f"KV {r.kv_cache_bytes / 2**20:.1f} MiB  {outs}")
  same = [a == b for a, b in zip(rows["full"]["outputs"], rows["duo"]["outputs"])]
  print(f"duo answers identical to full on {sum(same)}/{len(same)} prompts")
  if a.out:
    json.dump({"length": a.length, "sparsity": a.sparsity, "answers": answers, **rows},
              open(a.out, "w"), indent=1)


if __name__ == "__main__":
  main()
