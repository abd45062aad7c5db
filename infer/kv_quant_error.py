"""Where a quantised KV cache loses accuracy: each layer's attention error, keys apart from values.

  python -m infer.kv_quant_error --ckpt qwen2.5-coder-0.5b --tokens 2048 --out OUT
      # -> OUT/kv_quant_error.{json,png}, OUT/table.md (also printed)

One forward pass over real text (the haystack essays by default) with exact fp32 causal
attention. At every layer the same q, k, v are then attended once more with k and / or v
sent through the cache's quantisation round trip (`duojax.kv_quant.roundtrip`: the values
the kernels read back), and the output's error relative to the exact one is recorded:

  rel_err = ||attn(q, k', v') - attn(q, k, v)|| / ||attn(q, k, v)||   (all tokens and heads)

The residual stream stays exact, so a layer's figure is its own loss, not a sum of the
layers before it. Variants: K or V alone at 8 / 4 bits, both (what `--kv-dtype int8 /
int4` store), int8 keys with int4 values (`--kv-dtype k8v4`), and int4 keys after a
static per-channel rescaling of q and k ("smoothed"): for each KV head and RoPE pair, k
is divided and q multiplied by s = 2^round(log2(sqrt(rms|k| / rms|q|))) over the same
tokens (in-sample, so an optimistic bound for such a static fix). The scale is a power of
two and shared by the two channels RoPE rotates together, so q . k is unchanged exactly;
only the int4 rounding sees the rescaled channels. "K4 per-channel" is KIVI's key grouping
(a range per channel over 128 tokens), computed here only: duojax's caches do not store it.

Why this tool exists: int4 (one scale and zero per token per KV head) keeps SmolLM2 usable
but breaks Qwen2.5 (issue 18's grid, ppl 30 -> 213), and this says which buffer and which
layers carry the loss, and whether a fix without a new cache layout is worth building.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from duojax import kv_quant
from duojax.config import ModelConfig
from duojax.model import ops

CHANNEL_GROUP = 128  # tokens a per-channel key range spans (KIVI's group size)

# name -> (key bits, value bits, how keys are grouped); bits None: exact. Key grouping:
# "token" as the cache stores them (a range per token per KV head), "smoothed" the same
# after the static rescaling, "channel" a range per channel over CHANNEL_GROUP tokens
# (KIVI; not a cache layout duojax has: the figure says what building it would buy)
VARIANTS: dict[str, tuple[int | None, int | None, str]] = {
    "K8": (8, None, "token"), "V8": (None, 8, "token"), "int8 (K8 V8)": (8, 8, "token"),
    "K4": (4, None, "token"), "V4": (None, 4, "token"), "int4 (K4 V4)": (4, 4, "token"),
    "K8 V4": (8, 4, "token"), "K4 smoothed": (4, None, "smoothed"),
    "K4 per-channel": (4, None, "channel"),
}


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """q [T, Hkv, G, D], k, v [T, Hkv, D] -> [T, Hkv, G, D], fp32, every query seeing keys <= it."""
  t, d = q.shape[0], q.shape[-1]
  s = jnp.einsum("thgd,shd->hgts", q, k, precision="highest") / np.sqrt(d)
  s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -jnp.inf)
  return jnp.einsum("hgts,shd->thgd", jax.nn.softmax(s, axis=-1), v, precision="highest")


def smoothing_scales(q: jax.Array, k: jax.Array) -> jax.Array:
  """[Hkv, D] power-of-two scales, equal on each RoPE pair (i, i + D/2): k / s, q * s."""
  def pair_rms(x, axes):  # rms over `axes` of the pair magnitude -> [..., D/2]
    a, b = jnp.split(x, 2, axis=-1)
    return jnp.sqrt(jnp.mean(a * a + b * b, axis=axes))
  ratio = pair_rms(k, (0,)) / jnp.maximum(pair_rms(q, (0, 2)), 1e-30)  # [Hkv, D/2]
  s = 2.0 ** jnp.round(jnp.log2(jnp.sqrt(jnp.maximum(ratio, 1e-30))))
  return jnp.concatenate([s, s], axis=-1)


def channel_roundtrip(k: jax.Array, bits: int, group: int = CHANNEL_GROUP) -> jax.Array:
  """k [T, Hkv, D] quantised with one asymmetric range per (group of tokens, head, channel);
  the last group may be shorter."""
  t = k.shape[0]
  pad = -t % group
  kp = jnp.pad(k, ((0, pad), (0, 0), (0, 0)), mode="edge")  # edge rows leave min/max as is
  kg = kp.reshape(-1, group, *k.shape[1:])
  lo, hi = kg.min(1, keepdims=True), kg.max(1, keepdims=True)
  scale = jnp.maximum(hi - lo, 1e-30) / (2 ** bits - 1)
  out = jnp.round((kg - lo) / scale) * scale + lo
  return out.reshape(kp.shape)[:t]


def layer_errors(q: jax.Array, k: jax.Array, v: jax.Array,
                 variants=VARIANTS) -> dict[str, float]:
  """One layer's rel_err per variant; q [T, Hkv, G, D], k, v [T, Hkv, D] (RoPE applied)."""
  exact = causal_attention(q, k, v)
  norm = jnp.linalg.norm(exact)
  out = {}
  for name, (kb, vb, keys) in variants.items():
    qq, kk = q, k
    if keys == "smoothed":
      s = smoothing_scales(q, k)
      qq, kk = q * s[:, None, :], k / s
    if kb is not None:
      kk = channel_roundtrip(kk, kb) if keys == "channel" else kv_quant.roundtrip(kk, kb)
    vv = v if vb is None else kv_quant.roundtrip(v, vb)
    out[name] = float(jnp.linalg.norm(causal_attention(qq, kk, vv) - exact) / norm)
  return out


def key_outliers(k: jax.Array) -> float:
  """max / median over a layer's (head, RoPE pair) rms key magnitudes."""
  a, b = jnp.split(k, 2, axis=-1)
  m = jnp.sqrt(jnp.mean(a * a + b * b, axis=0)).ravel()
  return float(jnp.max(m) / jnp.median(m))


def run(config: ModelConfig, params: dict, tokens: np.ndarray, variants=VARIANTS,
        progress=None) -> list[dict]:
  """Per layer: {"layer", "key_outliers", "errors": {variant: rel_err}}. tokens [T]; params
  the plain per-layer dict in fp32 (HF head order: this reads no pattern)."""
  t = len(tokens)
  pos = jnp.arange(t, dtype=jnp.int32)[None]
  x = jnp.take(params["embed"], jnp.asarray(tokens)[None], axis=0)
  eps = config.rms_norm_eps
  rows = []
  for i, lp in enumerate(params["layers"]):
    q, k, v = ops.qkv(lp, ops.rms_norm(x, lp["attn_norm"], eps), config, pos)
    o = causal_attention(q[0], k[0], v[0])
    rows.append({"layer": i, "key_outliers": key_outliers(k[0]),
                 "errors": layer_errors(q[0], k[0], v[0], variants)})
    x = x + ops.out_proj(o[None], lp["wo"])
    x = x + ops.mlp(lp, x, config)
    if progress is not None:
      progress(i)
  return rows


def summary(rows: list[dict]) -> dict[str, dict]:
  names = list(rows[0]["errors"])
  out = {}
  for n in names:
    e = np.array([r["errors"][n] for r in rows])
    out[n] = {"mean": float(e.mean()), "median": float(np.median(e)), "max": float(e.max()),
              "worst_layer": int(e.argmax())}
  return out


def table(doc: dict) -> str:
  s = doc["summary"]
  lines = [f"{doc['ckpt']}, {doc['tokens']} tokens: attention-output error relative to fp32, "
           f"per layer (the residual stream kept exact)", "",
           "| cache | mean | median | worst (layer) |", "|---|---|---|---|"]
  for n, r in s.items():
    lines.append(f"| {n} | {r['mean']:.3f} | {r['median']:.3f} | "
                 f"{r['max']:.3f} ({r['worst_layer']}) |")
  ko = [r["key_outliers"] for r in doc["layers"]]
  lines += ["", f"key outliers (max / median rms over heads x RoPE pairs): median "
            f"{np.median(ko):.1f}, max {max(ko):.1f} (layer {int(np.argmax(ko))})"]
  return "\n".join(lines)


def plot(doc: dict, path: Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(8, 4.5))
  layers = [r["layer"] for r in doc["layers"]]
  for n in doc["summary"]:
    ax.plot(layers, [r["errors"][n] for r in doc["layers"]], marker=".", label=n)
  ax.set_yscale("log")
  ax.set_xlabel("layer")
  ax.set_ylabel("relative attention-output error")
  ax.set_title(f"{doc['ckpt']}: quantised KV round trip, {doc['tokens']} tokens")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=8, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--ckpt", default=None, help="checkpoint folder or embedded name "
                  "(default smollm2-135m)")
  ap.add_argument("--tokens", type=int, default=1024,
                  help="text tokens (attention is dense: memory grows as tokens^2)")
  ap.add_argument("--haystack", default=None, help="text (folder of .txt, .txt, .json/.jsonl; "
                  "default: the Paul Graham essays)")
  ap.add_argument("--offset", type=int, default=0, help="first text token")
  ap.add_argument("--out", required=True)
  ap.add_argument("--no-progress", dest="progress", action="store_false")
  a = ap.parse_args(argv)
  if a.tokens < 2:
    ap.error("--tokens must be at least 2")
  from duojax.checkpoint.handle import Checkpoint
  from duojax.eval import harness
  ck = Checkpoint.open(a.ckpt, progress=a.progress)
  hay, hay_path = harness.load_haystack_tokens(a.haystack, ck.tokenizer())
  ids = np.asarray(hay.ids[a.offset:a.offset + a.tokens])
  if len(ids) < a.tokens:
    ap.error(f"the text holds {len(hay.ids)} tokens; lower --tokens or --offset")
  params = ck.params(dtype=jnp.float32)
  bar = None
  if a.progress:
    from tqdm.auto import tqdm
    bar = tqdm(total=ck.config.num_layers, desc="layers", unit="layer")
  rows = run(ck.config, params, ids, progress=(lambda i: bar.update(1)) if bar else None)
  if bar:
    bar.close()
  doc = {"ckpt": ck.config.name or str(a.ckpt), "tokens": a.tokens, "offset": a.offset,
         "haystack": hay_path, "layers": rows, "summary": summary(rows),
         "device": jax.devices()[0].platform}
  out = Path(a.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "kv_quant_error.json").write_text(json.dumps(doc, indent=1))
  md = table(doc)
  (out / "table.md").write_text(md + "\n")
  plot(doc, out / "kv_quant_error.png")
  print(md)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
