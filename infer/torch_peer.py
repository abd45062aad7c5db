"""A strong PyTorch peer for decode benchmarks: a Llama decode step over a static KV cache,
`scaled_dot_product_attention` with GQA, the whole step captured in one CUDA graph (the
gpt-fast approach), written here so that duojax is compared against more than HF eager.

  python -m infer.torch_peer --out OUT --contexts 32,128,256 --batches 1,16     # GPU
  python -m infer.torch_peer --out /tmp/tp --smoke                               # CPU check

The step is plain torch (no custom kernels): embedding row, per layer RMSNorm -> q/k/v ->
RoPE -> write the new key/value at each row's position -> sdpa over the whole static cache
with a per-row length mask -> o_proj -> MLP, final norm, LM head, greedy argmax. Weights are
random bf16 of the model's real shape (speed does not depend on their values), or taken
from an HF `LlamaForCausalLM` (`from_hf`, which the test uses to check the logits).
Like gpt-fast, each step attends over the cache's whole capacity (static shapes are what
makes graph capture possible), so the benchmark sizes the cache at context + steps.

floor = (weight bytes + KV bytes up to the context) / copy bandwidth measured in this run
(a 2 GiB `clone`, read + write bytes). Writes torch_peer.json, torch_peer.md and a PNG.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

K = 1024


class StaticLlama:
  """Llama-family decoder for one-token steps over a static cache.

  Shapes: weights per layer wq [Hq*D, E], wk/wv [Hkv*D, E], wo [E, Hq*D]; the cache is
  k, v: [L, B, Hkv, S, D] (heads before positions, the layout sdpa reads without copies).
  """

  def __init__(self, cfg: dict, weights: dict, batch: int, capacity: int, device, dtype):
    self.cfg, self.w = cfg, weights
    self.batch, self.capacity, self.device, self.dtype = batch, capacity, device, dtype
    L, hkv, d = cfg["num_layers"], cfg["num_kv_heads"], cfg["head_dim"]
    shape = (L, batch, hkv, capacity, d)
    self.k = torch.zeros(shape, dtype=dtype, device=device)
    self.v = torch.zeros(shape, dtype=dtype, device=device)
    self.inv_freq = weights["inv_freq"].to(device=device, dtype=torch.float32)
    self.rows = torch.arange(batch, device=device)
    self.slots = torch.arange(capacity, device=device)
    self.graph = None

  # -- construction -----------------------------------------------------------------------

  @staticmethod
  def random_weights(cfg: dict, device, dtype, seed: int = 0) -> dict:
    E, D, I = cfg["hidden_size"], cfg["head_dim"], cfg["intermediate_size"]
    hq, hkv, V = cfg["num_heads"], cfg["num_kv_heads"], cfg["vocab_size"]
    torch.manual_seed(seed)

    def rnd(*shape):  # filled on the device: 8B of host-drawn values would take minutes
      return torch.empty(shape, dtype=dtype, device=device).normal_(0.0, 0.02)

    layers = [{"ln1": torch.ones(E, dtype=dtype, device=device),
               "ln2": torch.ones(E, dtype=dtype, device=device),
               "wq": rnd(hq * D, E), "wk": rnd(hkv * D, E), "wv": rnd(hkv * D, E),
               "wo": rnd(E, hq * D), "wg": rnd(I, E), "wu": rnd(I, E), "wd": rnd(E, I)}
              for _ in range(cfg["num_layers"])]
    inv_freq = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    return {"embed": rnd(V, E), "norm": torch.ones(E, dtype=dtype, device=device),
            "lm_head": rnd(V, E), "layers": layers, "inv_freq": inv_freq}

  @staticmethod
  def from_hf(model) -> tuple[dict, dict]:
    """(cfg, weights) from an HF LlamaForCausalLM (weights shared, not copied)."""
    c = model.config
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    cfg = {"num_layers": c.num_hidden_layers, "num_heads": c.num_attention_heads,
           "num_kv_heads": c.num_key_value_heads, "head_dim": hd,
           "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
           "vocab_size": c.vocab_size, "rms_eps": c.rms_norm_eps,
           "rope_theta": getattr(c, "rope_theta", None) or 10000.0}
    m = model.model
    layers = [{"ln1": l.input_layernorm.weight, "ln2": l.post_attention_layernorm.weight,
               "wq": l.self_attn.q_proj.weight, "wk": l.self_attn.k_proj.weight,
               "wv": l.self_attn.v_proj.weight, "wo": l.self_attn.o_proj.weight,
               "wg": l.mlp.gate_proj.weight, "wu": l.mlp.up_proj.weight,
               "wd": l.mlp.down_proj.weight} for l in m.layers]
    # HF's rotary module holds inv_freq with any rope scaling (llama3, ...) already applied.
    return cfg, {"embed": m.embed_tokens.weight, "norm": m.norm.weight,
                 "lm_head": model.lm_head.weight, "layers": layers,
                 "inv_freq": m.rotary_emb.inv_freq.detach().clone()}

  # -- the step ---------------------------------------------------------------------------

  def _norm(self, x, w):
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.cfg["rms_eps"])
    return w * xf.to(x.dtype)

  def _rope(self, x, pos):  # x [B, H, D], pos [B]
    ang = pos.float()[:, None] * self.inv_freq[None, :]  # [B, D/2]
    cos = torch.cat([ang.cos(), ang.cos()], -1)[:, None, :]
    sin = torch.cat([ang.sin(), ang.sin()], -1)[:, None, :]
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], -1)
    return (x.float() * cos + rot.float() * sin).to(x.dtype)

  @torch.no_grad()
  def step(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """tokens [B] int64 at positions pos [B] -> logits [B, V]; writes the cache at pos."""
    c, w = self.cfg, self.w
    B, hq, hkv, d = self.batch, c["num_heads"], c["num_kv_heads"], c["head_dim"]
    x = w["embed"][tokens]  # [B, E]
    visible = (self.slots[None, :] <= pos[:, None])[:, None, None, :]  # [B, 1, 1, S]
    for i, lw in enumerate(w["layers"]):
      h = self._norm(x, lw["ln1"])
      q = self._rope((h @ lw["wq"].T).view(B, hq, d), pos)
      k = self._rope((h @ lw["wk"].T).view(B, hkv, d), pos)
      v = (h @ lw["wv"].T).view(B, hkv, d)
      self.k[i][self.rows, :, pos] = k
      self.v[i][self.rows, :, pos] = v
      o = F.scaled_dot_product_attention(q[:, :, None, :], self.k[i], self.v[i],
                                         attn_mask=visible, enable_gqa=hq != hkv)
      x = x + o.reshape(B, hq * d) @ lw["wo"].T
      h = self._norm(x, lw["ln2"])
      x = x + (F.silu(h @ lw["wg"].T) * (h @ lw["wu"].T)) @ lw["wd"].T
    return self._norm(x, w["norm"]) @ w["lm_head"].T

  def capture(self, warmup: int = 3) -> None:
    """Record one step in a CUDA graph; `replay` then runs it with new inputs."""
    self.tok_in = torch.zeros(self.batch, dtype=torch.long, device=self.device)
    self.pos_in = torch.zeros(self.batch, dtype=torch.long, device=self.device)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
      for _ in range(warmup):
        self.step(self.tok_in, self.pos_in)
    torch.cuda.current_stream().wait_stream(s)
    self.graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(self.graph):
      self.logits_out = self.step(self.tok_in, self.pos_in)

  def replay(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    self.tok_in.copy_(tokens)
    self.pos_in.copy_(pos)
    self.graph.replay()
    return self.logits_out


# -- benchmark ------------------------------------------------------------------------------

LLAMA3_8B = {"num_layers": 32, "num_heads": 32, "num_kv_heads": 8, "head_dim": 128,
             "hidden_size": 4096, "intermediate_size": 14336, "vocab_size": 128256,
             "rms_eps": 1e-5, "rope_theta": 500000.0}
LLAMA2_7B = {**LLAMA3_8B, "num_kv_heads": 32, "intermediate_size": 11008, "vocab_size": 32000,
             "rope_theta": 10000.0}
TINY = {"num_layers": 2, "num_heads": 8, "num_kv_heads": 4, "head_dim": 16, "hidden_size": 64,
        "intermediate_size": 128, "vocab_size": 256, "rms_eps": 1e-5, "rope_theta": 1e4}
MODELS = {"llama3-8b": LLAMA3_8B, "llama2-7b": LLAMA2_7B}


def copy_GBps(nbytes: int = 2 * 2**30) -> float:
  t = torch.ones(nbytes // 2, dtype=torch.bfloat16, device="cuda")
  for _ in range(3):
    t.clone()
  ts = []
  for _ in range(10):
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    u = t.clone()
    b.record()
    torch.cuda.synchronize()
    ts.append(a.elapsed_time(b) / 1e3)
    del u
  del t
  torch.cuda.empty_cache()
  return 2 * nbytes / statistics.median(ts) / 1e9


def bytes_read(cfg: dict, ctx: int, batch: int, item: int = 2) -> int:
  E, D, I = cfg["hidden_size"], cfg["head_dim"], cfg["intermediate_size"]
  per_layer = E * D * (2 * cfg["num_heads"] + 2 * cfg["num_kv_heads"]) + 3 * E * I + 2 * E
  weights = cfg["num_layers"] * per_layer + cfg["vocab_size"] * E + E
  kv = 2 * cfg["num_layers"] * batch * cfg["num_kv_heads"] * ctx * D
  return (weights + kv) * item


def time_steps(model: StaticLlama, ctx: int, steps: int, graph: bool) -> float:
  """Median seconds per decode step at context ctx (cache filled with random values)."""
  dev = model.device
  tok = torch.full((model.batch,), 5, dtype=torch.long, device=dev)
  times = []
  for i in range(steps + 2):
    pos = torch.full((model.batch,), ctx + i, dtype=torch.long, device=dev)
    if dev.type == "cuda":
      a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
      a.record()
      logits = model.replay(tok, pos) if graph else model.step(tok, pos)
      tok = logits.argmax(-1)
      b.record()
      torch.cuda.synchronize()
      dt = a.elapsed_time(b) / 1e3
    else:
      t0 = time.perf_counter()
      tok = model.step(tok, pos).argmax(-1)
      dt = time.perf_counter() - t0
    if i >= 2:
      times.append(dt)
  return statistics.median(times)


def measure(name: str, cfg: dict, batches, ctxs, steps: int, copy: float | None,
            cuda: bool) -> list[dict]:
  """One row per (batch, context): ms per token (CUDA graph on a GPU, eager on a CPU)."""
  dev = torch.device("cuda" if cuda else "cpu")
  dtype = torch.bfloat16 if cuda else torch.float32
  weights = StaticLlama.random_weights(cfg, dev, dtype)
  rows = []
  for batch in batches:
    for ctx in ctxs:
      row = {"model": name, "impl": "torch-sdpa-cudagraph" if cuda else "torch-sdpa-eager",
             "batch": batch, "ctx": ctx}
      model = None
      try:
        if cuda:
          torch.cuda.empty_cache()
          torch.cuda.reset_peak_memory_stats()
        model = StaticLlama(cfg, weights, batch, ctx + steps + 2, dev, dtype)
        model.k.normal_()
        model.v.normal_()
        if cuda:
          model.capture()
        row["ms_per_token"] = time_steps(model, ctx, steps, graph=cuda) * 1e3
        if cuda and copy:
          row["peak_GB"] = torch.cuda.max_memory_allocated() / 1e9
          row["floor_ms"] = bytes_read(cfg, ctx, batch) / (copy * 1e9) * 1e3
          row["x_floor"] = row["ms_per_token"] / row["floor_ms"]
      except torch.cuda.OutOfMemoryError as e:  # type: ignore[attr-defined]
        row["error"] = "OOM: " + str(e).split("\n")[0][:160]
      del model
      print("[peer]", json.dumps(row), flush=True)
      rows.append(row)
  del weights
  if cuda:
    torch.cuda.empty_cache()
  return rows


def run(args) -> dict:
  cuda = torch.cuda.is_available() and not args.smoke
  copy = copy_GBps() if cuda else None
  print(f"torch {torch.__version__}, cuda {cuda}, copy {copy and round(copy)} GB/s", flush=True)
  models = {"tiny": TINY} if args.smoke else {m: MODELS[m] for m in args.models.split(",")}
  ctxs = [64, 200] if args.smoke else [int(c) * K for c in args.contexts.split(",")]
  batches = [1, 2] if args.smoke else [int(b) for b in args.batches.split(",")]
  rows = []
  for name, cfg in models.items():
    rows += measure(name, cfg, batches, ctxs, args.steps, copy, cuda)
  return {"torch": torch.__version__, "copy_GBps": copy, "steps": args.steps, "rows": rows}


def write(result: dict, out: Path) -> None:
  out.mkdir(parents=True, exist_ok=True)
  (out / "torch_peer.json").write_text(json.dumps(result, indent=2))
  lines = ["| model | impl | batch | context | ms/token | floor ms | x floor | peak GB |",
           "|---|---|---|---|---|---|---|---|"]
  for r in result["rows"]:
    f = lambda k, fmt: (fmt.format(r[k]) if k in r else r.get("error", "-")[:30])  # noqa: E731
    lines.append(f"| {r['model']} | {r['impl']} | {r['batch']} | {r['ctx'] // K if r['ctx'] >= K else r['ctx']}"
                 f"{'K' if r['ctx'] >= K else ''} | {f('ms_per_token', '{:.2f}')} | "
                 f"{f('floor_ms', '{:.2f}')} | {f('x_floor', '{:.2f}')} | {f('peak_GB', '{:.1f}')} |")
  table = "\n".join(lines)
  (out / "torch_peer.md").write_text(table + "\n")
  print(table)
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  keys = sorted({(r["model"], r["batch"]) for r in result["rows"]})
  for m, b in keys:
    rs = [r for r in result["rows"] if (r["model"], r["batch"]) == (m, b) and "ms_per_token" in r]
    ax.plot([r["ctx"] for r in rs], [r["ms_per_token"] for r in rs], "o-", label=f"{m} b{b}")
    if rs and "floor_ms" in rs[0]:
      ax.plot([r["ctx"] for r in rs], [r["floor_ms"] for r in rs], "k--", lw=0.8)
  ax.set_xscale("log", base=2)
  ax.set_xlabel("context (tokens)")
  ax.set_ylabel("ms per token")
  ax.set_title("PyTorch peer: sdpa + static cache + CUDA graph (dashed: floor)")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(out / "torch_peer.png", dpi=120)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--out", required=True)
  ap.add_argument("--models", default="llama3-8b", help=f"comma list of {sorted(MODELS)}")
  ap.add_argument("--contexts", default="32,128,256", help="in K tokens")
  ap.add_argument("--batches", default="1")
  ap.add_argument("--steps", type=int, default=16)
  ap.add_argument("--smoke", action="store_true", help="tiny model on the CPU (checks the script)")
  a = ap.parse_args(argv)
  bad = [m for m in a.models.split(",") if m not in MODELS]
  if bad:
    ap.error(f"unknown --models {bad}; choose from {sorted(MODELS)}")
  write(run(a), Path(a.out))
  return 0


if __name__ == "__main__":
  sys.exit(main())
