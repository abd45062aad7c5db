"""Per-token decode latency and memory: full attention vs DuoAttention, against HF
transformers and the memory-bandwidth floor; and, with --capacity, the longest context
that decodes on this device.

  python -m infer.bench_decode --out out/bench_decode                 # GPU, defaults below
  python -m infer.bench_decode --out /tmp/bd --smoke                  # CPU check (tiny model)
  python -m infer.bench_decode --out OUT --models llama3-8b --contexts 32K,128K,1M \\
      --batches 1,16 --max-batch-ctx 1M --kv-dtype bf16,int8,int4 --weights-dtype bf16,int8
  python -m infer.bench_decode --out OUT --paths plain,mesh,cp --mesh sequence=1 ...
                          # today's path vs the same on a mesh of one device vs forced
                          # context parallelism (shard_map + partial softmax), one table
  python -m infer.bench_decode --out OUT --mesh sequence=8           # 8 devices, context parallel
  python -m infer.bench_decode --out OUT --capacity --models llama3-8b --batches 1 \\
      --sparsities 0.5,0.75 --kv-dtype int4 --weights-dtype int8 [--mem-limit-GiB 80]

Contexts (--contexts, --max-batch-ctx, --hf-contexts, --capacity-start): a plain number
is K tokens as before (128 = 131072); suffixes K = 1024, M = 1024 * 1024 tokens
(binary, like K: 1M = 1048576, 3.3M = round(3.3 * 2**20) = 3460301), fractions allowed
(2.5M, 1.5K); a `t` suffix is an exact token count (3300000t, for decimal figures such
as a paper's "3.3M"). Rows always carry the exact token count (`ctx`).

Models: the Llama-3-8B shape (GQA 32/8) and the Llama-2-7B shape (MHA 32/32),
pseudo-random weights made on the device, bf16 or (--weights-dtype int8) int8 projections
through qwix (duojax/model/quant.py; built layer by layer, so the bf16 model is never
whole beside the int8 one). Configs: full attention and duo at each
--sparsities (random head masks of exactly that fraction of streaming heads, seeded; sink
64, recent 256; --configs keeps some, e.g. duo-0.5,duo-0.75).
KV cache: --kv-dtype bf16, int8, int4 or k8v4 (int8 keys, int4 values; codes + float32
scale and zero per token per KV head), a comma list runs each. For each (model, weights,
batch, config, KV dtype, path) the decode loop (`engine.decode`, a jitted while_loop,
greedy sampling) is compiled once for a cache of the largest context that fits; the cache
is filled with pseudo-random values (a hash of each slot's position: no RNG temporaries at
large capacities, the same values on every path) and
`cache.lengths` set to each context in turn (the kernels read each row only up to its
length, so the capacity does not change the work), and --steps tokens are decoded;
per-token latency = wall time / steps, median of 3 after a warm-up call. Each row keeps
row 0's greedy tokens (`tokens`), so paths can be compared token for token.

Paths (--paths, comma list): `plain` (today's single-device path), `mesh` (weights and
cache placed on the --mesh with `engine.place_on_mesh`, the backend from
`engine.mesh_backend`: the name itself on one device, context parallel where the cache
splits over sequence), `cp` (`context_parallel.ContextParallel(mesh, backend)` forced,
also on a mesh of one device: the shard_map + partial-softmax route several GPUs take).
Default: plain; `--mesh SPEC` alone means mesh, `--mesh SPEC --context-parallel` cp
(--paths without --mesh uses sequence=1). Rows are labelled by impl, e.g. `duojax-gpu`,
`duojax-gpu mesh sequence=1`, `duojax-gpu cp sequence=1`.

floor = (weight bytes read + KV bytes read) / copy bandwidth, with the copy
bandwidth measured in this run (the faster of a jitted device copy and torch's clone,
read + write bytes; --copy-GBps gives it instead); weight
bytes are the bytes the weights occupy (int8 codes + scales for int8) less the
embedding table (one row of it per batch row is read), KV bytes are the retrieval
heads' keys/values up to the context plus the streaming heads' sink + recent slots
(codes + scales + zeros for int8/int4). Memory: `peak` = weights + the cache at
exactly that context + XLA's temporary buffers of the compiled step (from the
compiled executable), i.e. what a run with capacity = context holds (per device on a mesh).

--capacity: for each (model, weights dtype, KV dtype, batch, config), in a child process
of its own (a clean device and a clean peak counter), the longest context that decodes
--steps tokens: the start is the estimate weights + cache(capacity) + the compiled step's
temp <= limit - 2% (limit: the device's `bytes_limit`, which XLA_PYTHON_CLIENT_MEM_FRACTION
sets, or --mem-limit-GiB if lower), or --capacity-start; then the cache is allocated and
decoded; an out-of-memory error (or, under --mem-limit-GiB, an estimate or a measured
peak above it) backs off by --capacity-backoff (3%) and tries again, at most
--capacity-tries times. Reports the longest that worked: its ms/token, the floor,
`peak_bytes_in_use` from memory_stats(), and every try. Writes bench_capacity.json/.md.

HF transformers runs first, in a child process (PyTorch alone on the GPU):
LlamaForCausalLM, attn_implementation="sdpa", a StaticCache filled with random
values, one token per step, eager; timed with CUDA events, median of the steps.
In the same child, the strong peer (infer/torch_peer.py, unless --no-peer): our own
torch Llama step, sdpa with GQA over a static cache, the whole step captured in a
CUDA graph (the gpt-fast approach), batch 1 and the --batches > 1.
Writes bench_decode.json, bench_decode.md and bench_decode.png into --out.
"""

from __future__ import annotations

import argparse
import datetime
import decimal
import gc
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from duojax.config import DEPLOY

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
K = 1024
M = K * K
GiB = 2**30
SINK, RECENT = DEPLOY.sink, DEPLOY.recent
KV_DTYPES = ("bf16", "int8", "int4", "k8v4")
WEIGHT_DTYPES = ("bf16", "int8")
PATHS = ("plain", "mesh", "cp")


# -- contexts ------------------------------------------------------------------------------

_CTX = re.compile(r"(\d+(?:\.\d*)?|\.\d+)([kKmMtT]?)")


def parse_context(text: str) -> int:
  """One context length in tokens: "128" and "128K" = 131072 (a plain number is K tokens,
  as this flag always took), "1M" = 1048576, "2.5M" = 2621440, "3.3M" = 3460301
  (round(3.3 * 2**20)), "3300000t" = 3300000 (an exact count)."""
  m = _CTX.fullmatch(str(text).strip())
  if not m:
    raise ValueError(f"context {text!r}: write K tokens (128), or 512K, 1M, 3.3M, or an "
                     "exact count with t (3300000t)")
  num, unit = m.group(1), (m.group(2) or "K").upper()
  if unit == "T" and "." in num:
    raise ValueError(f"context {text!r}: a t count is whole tokens (3300000t)")
  n = int((decimal.Decimal(num) * {"K": K, "M": M, "T": 1}[unit]).to_integral_value(
      decimal.ROUND_HALF_UP))
  if n < 1:
    raise ValueError(f"context {text!r} is less than one token")
  return n


def parse_contexts(spec: str) -> list[int]:
  return [parse_context(c) for c in str(spec).split(",") if c.strip()]


def kfmt(n: int) -> str:
  """1048576 -> 1M, 131072 -> 128K, 3460301 -> 3460301 (exact where not round)."""
  if n >= M and n % M == 0:
    return f"{n // M}M"
  return f"{n // K}K" if n >= K and n % K == 0 else str(n)


# -- models and bytes ----------------------------------------------------------------------

def model_configs(smoke: bool):
  from duojax.config import LLAMA2_7B, LLAMA3_8B, tiny_config
  if smoke:
    return {"tiny-gqa": tiny_config(num_layers=2, head_dim=16, hidden_size=64, num_heads=8,
                                    num_kv_heads=4, max_position_embeddings=1 << 20),
            "tiny-mha": tiny_config(num_layers=2, head_dim=16, hidden_size=64, num_heads=4,
                                    num_kv_heads=4, max_position_embeddings=1 << 20)}
  return {"llama3-8b": LLAMA3_8B, "llama2-7b": LLAMA2_7B}


def selected_models(args) -> dict:
  """--models of this mode's configs (default: all of them)."""
  table = model_configs(args.smoke)
  if not args.models:
    return table
  names = [m.strip() for m in args.models.split(",") if m.strip()]
  bad = [m for m in names if m not in table]
  if bad:
    raise SystemExit(f"--models {','.join(bad)}: this mode has {', '.join(table)}"
                     + (" (--smoke runs the tiny models)" if args.smoke else ""))
  return {m: table[m] for m in names}


def random_mask(config, sparsity: float, seed: int = 0):
  """A HeadMask with exactly round((1 - sparsity) * L * Hkv) retrieval heads."""
  import numpy as np
  from duojax.pattern import HeadMask
  n = config.num_layers * config.num_kv_heads
  n_ret = int(round((1 - sparsity) * n))
  arr = np.zeros(n, bool)
  arr[np.random.default_rng(seed).permutation(n)[:n_ret]] = True
  return HeadMask.from_array(arr.reshape(config.num_layers, config.num_kv_heads), SINK, RECENT)


def weights_alloc(params) -> int:
  """Bytes the weights occupy: int8 codes + scales for quantised projections."""
  from duojax.model import quant
  return quant.weight_bytes(params)


def weight_bytes_read(config, params, batch: int = 1) -> int:
  """Bytes one decode step reads from the weights: all of them except the embedding table,
  of which each batch row reads one row (a tied LM head reads the whole table)."""
  emb = params["embed"]
  item = emb.dtype.itemsize
  unread = 0 if config.tie_word_embeddings else (emb.size - batch * config.hidden_size) * item
  return weights_alloc(params) - unread


def kv_bytes_read(config, mask, ctx: int, batch: int, item=2) -> int:
  d, hkv = config.head_dim, config.num_kv_heads
  total = 0
  for l in range(config.num_layers):
    n_r = hkv if mask is None else mask.n_retrieval(l)
    total += 2 * item * batch * d * (n_r * ctx + (hkv - n_r) * min(ctx, SINK + RECENT))
  return total


def kv_item(config, kv_dtype) -> float:
  """Bytes read per cached k or v element: 2 for bf16; int8 / int4 codes plus their float32
  scale and zero per token per KV head (duojax.kv_quant); k8v4: the mean of its int8 keys
  and int4 values."""
  from duojax import kv_quant
  bits = kv_quant.kv_bits_of(kv_dtype)
  if bits is None:
    return 4 if kv_dtype == "fp32" else 2
  return sum(kv_quant.nbytes((1, config.head_dim), b) for b in bits) / (2 * config.head_dim)


def dtype_list(spec: str, allowed, flag: str) -> list[str]:
  out = [s.strip() for s in spec.split(",") if s.strip()]
  bad = [s for s in out if s not in allowed]
  if bad or not out:
    raise SystemExit(f"{flag} {spec!r}: choose from {', '.join(allowed)} (a comma list runs each)")
  return list(dict.fromkeys(out))


# -- HF transformers (child process, torch only) -------------------------------------------

def torch_copy_GBps(nbytes=2 * 2**30):
  """(read + write bytes) / time of a device-to-device copy through torch, or None."""
  import torch
  if not torch.cuda.is_available():
    return None
  from infer import torch_peer
  return torch_peer.copy_GBps(nbytes)


def hf_worker(args):
  import torch
  from transformers import LlamaConfig, LlamaForCausalLM, StaticCache
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  copy = torch_copy_GBps() if dev == "cuda" else None
  print(f"[hf] torch device copy: {copy} GB/s", flush=True)
  rows = []
  for name, config in model_configs(args.smoke).items():
    if (name not in args.models.split(",") and not args.smoke) or not args.hf_eager:
      continue
    hf = dict(config.to_hf())
    hf.pop("architectures", None)
    hcfg = LlamaConfig(**hf)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device(dev):
      try:
        model = LlamaForCausalLM._from_config(hcfg, attn_implementation="sdpa",
                                              dtype=torch.bfloat16)
      except TypeError:
        model = LlamaForCausalLM._from_config(hcfg, attn_implementation="sdpa",
                                              torch_dtype=torch.bfloat16)
    model.eval()
    print(f"[hf] {name}: built in {time.perf_counter() - t0:.1f}s", flush=True)
    ctxs = contexts(args)
    if config.num_kv_heads == config.num_heads and not args.smoke:
      ctxs = parse_contexts(args.hf_contexts_mha)
    for ctx in ctxs:
      row = {"model": name, "impl": "hf-sdpa-static", "batch": 1, "ctx": ctx}
      cache = None
      try:
        if dev == "cuda":
          torch.cuda.empty_cache()
          torch.cuda.reset_peak_memory_stats()
        cache = StaticCache(config=model.config, max_cache_len=ctx + args.steps + 2)
        tok = torch.tensor([[5]], device=dev)
        with torch.no_grad():
          model(input_ids=tok, past_key_values=cache,
                cache_position=torch.tensor([0], device=dev), use_cache=True)
          for layer in cache.layers:
            layer.keys.normal_()
            layer.values.normal_()
          times = []
          for i in range(args.steps + 2):
            if dev == "cuda":
              a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
              a.record()
            t0 = time.perf_counter()
            out = model(input_ids=tok, past_key_values=cache,
                        cache_position=torch.tensor([ctx + i], device=dev), use_cache=True)
            tok = out.logits[:, -1:].argmax(-1)
            if dev == "cuda":
              b.record()
              torch.cuda.synchronize()
              dt = a.elapsed_time(b) / 1e3
            else:
              dt = time.perf_counter() - t0
            if i >= 2:
              times.append(dt)
        row["ms_per_token"] = statistics.median(times) * 1e3
        if dev == "cuda":
          row["peak_GB"] = torch.cuda.max_memory_allocated() / 1e9
      except torch.cuda.OutOfMemoryError as e:  # type: ignore[attr-defined]
        row["error"] = "OOM: " + str(e).split("\n")[0][:160]
      del cache
      print("[hf]", json.dumps(row), flush=True)
      rows.append(row)
    del model
    if dev == "cuda":
      torch.cuda.empty_cache()
  peer_rows = []
  if args.peer:  # the gpt-fast-style peer: sdpa over a static cache, the step in a CUDA graph
    from infer import torch_peer
    for name, config in model_configs(args.smoke).items():
      if name not in args.models.split(",") and not args.smoke:
        continue
      ctxs = contexts(args)
      if config.num_kv_heads == config.num_heads and not args.smoke:
        ctxs = parse_contexts(args.hf_contexts_mha)
      batches_ = [1] + [b for b in map(int, args.batches.split(",")) if b > 1]
      for b in batches_:
        cs = ctxs if b == 1 else [c for c in ctxs if c <= parse_context(args.max_batch_ctx)
                                         or args.smoke]
        peer_rows += torch_peer.measure(name, peer_config(config), [b], cs, 8, copy,
                                        dev == "cuda")
  Path(args.hf_json).write_text(json.dumps({"rows": rows, "peer": peer_rows,
                                            "torch_copy_GBps": copy}))


def peer_config(config) -> dict:
  return {"num_layers": config.num_layers, "num_heads": config.num_heads,
          "num_kv_heads": config.num_kv_heads, "head_dim": config.head_dim,
          "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
          "vocab_size": config.vocab_size, "rms_eps": config.rms_norm_eps,
          "rope_theta": config.rope_theta}


# -- JAX -----------------------------------------------------------------------------------

DEFAULT_CONTEXTS = "8,32,128,256,512"


def contexts(args):
  if args.contexts:
    return parse_contexts(args.contexts)
  return [64, 200] if args.smoke else parse_contexts(DEFAULT_CONTEXTS)


def copy_bandwidth(nbytes):
  import jax
  import jax.numpy as jnp
  x = jnp.ones((nbytes // 2,), jnp.bfloat16)
  f = jax.jit(lambda x: x.copy())
  jax.block_until_ready(f(x))
  ts = []
  for _ in range(10):
    t0 = time.perf_counter()
    jax.block_until_ready(f(x))
    ts.append(time.perf_counter() - t0)
  del x
  return 2 * nbytes / statistics.median(ts) / 1e9


def _hash_bits(shape, seed):
  """uint32 per element: a hash of the element's (b, s, h, d) position and `seed` (traced),
  not of a flat index, so the same slot holds the same value whatever the capacity
  (paths of different capacity multiples see the same cache)."""
  import jax
  import jax.numpy as jnp
  u32 = jnp.uint32
  h = jnp.full(shape, seed, u32) * u32(0x9E3779B9)
  for ax in range(len(shape)):
    h = (h ^ jax.lax.broadcasted_iota(u32, shape, ax)) * u32(2654435761)
    h = h ^ (h >> 15)
  h = h * u32(2246822519)
  return h ^ (h >> 13)


def _uniform(bits):
  """uint32 hash bits -> float32 uniform in [-2, 2) (std 4 / sqrt(12) = 1.155)."""
  import jax.numpy as jnp
  return ((bits >> 8) & jnp.uint32(0xFFFF)).astype(jnp.float32) * (4.0 / 65536) - 2.0


UNIFORM_STD = 4 / math.sqrt(12)


def _hash_fill(shape, dtype, seed, sharding=None):
  """Pseudo-random values computed in place from `_hash_bits`: no temporaries
  (jax.random.normal over a multi-GiB cache buffer makes a uint32 array of twice its size
  first, which a capacity search near the memory limit cannot afford), and a compile
  several times cheaper than threefry's. Integer codes get uniform bytes; floats uniform
  values in [-2, 2)."""
  import jax
  import jax.numpy as jnp
  key = (tuple(shape), str(dtype), sharding)
  f = _FILLS.get(key)
  if f is None:
    def fill(seed):
      h = _hash_bits(shape, seed)
      if jnp.issubdtype(dtype, jnp.integer):
        return ((h >> 8) & jnp.uint32(0xFF)).astype(jnp.uint8).astype(dtype)
      return _uniform(h).astype(dtype)
    f = _FILLS[key] = jax.jit(fill, out_shardings=sharding)
  return f(jnp.uint32(seed))


_FILLS: dict = {}


def random_cache(config, batch, capacity, mask, seed=0, kv_dtype=None, shardings=None):
  """A cache of pseudo-random values (lengths 0). shardings: a NamedSharding per cache
  array (sharding.cache_shardings) to make each one straight into its place on a mesh."""
  import jax
  import jax.numpy as jnp
  leaves, tree = jax.tree_util.tree_flatten(cache_shapes(config, batch, capacity, mask,
                                                         kv_dtype))
  shard_leaves = (jax.tree_util.tree_leaves(shardings) if shardings is not None
                  else [None] * len(leaves))
  out = []
  for i, (s, sh) in enumerate(zip(leaves, shard_leaves)):
    if s.dtype == jnp.int32:  # lengths
      out.append(jnp.zeros(s.shape, jnp.int32) if sh is None
                 else jax.device_put(jnp.zeros(s.shape, jnp.int32), sh))
    else:
      out.append(_hash_fill(s.shape, s.dtype, seed * 1000 + i, sh))
  return jax.tree_util.tree_unflatten(tree, out)


def build_params(config, weights_dtype: str = "bf16", seed: int = 0, pack: bool = True):
  """Pseudo-random weights of `config` as the plain params dict, each tensor from its own
  seed (so bf16 and int8 builds hold the same values before quantisation). int8: each
  layer is made in bf16 and quantised before the next is made, so the whole bf16 model
  never sits beside the int8 one (an 8B model: 16 GB + 8 GB), and the freed bf16 buffers
  are one layer's size, reused by the next layer instead of fragmenting device memory.
  pack: each layer's q/k/v and gate/up packed as they are made (duojax/model/pack.py, what
  serving.load_model serves), so the unpacked layer is freed at once; same values, same
  bytes."""
  import jax
  from duojax.layout import param_shapes
  from duojax.model import quant
  from duojax.model.pack import pack_layer
  shapes = param_shapes(config)
  counter = iter(range(1 << 20))

  def make(shape):
    return _random_weight(seed * (1 << 20) + 7919 * next(counter) + 1, tuple(shape))

  def quantised(tree):
    if weights_dtype == "bf16":
      return tree
    q = quant.quantize_params(tree, weights_dtype)
    jax.block_until_ready(q)
    return q

  out = {"embed": make(shapes["embed"]), "final_norm": make(shapes["final_norm"])}
  layers = []
  for lshapes in shapes["layers"]:
    lp = {n: make(s) for n, s in lshapes.items()}
    lp = quantised({"layers": [lp]})["layers"][0]
    layers.append(pack_layer(lp) if pack else lp)
    del lp
  out["layers"] = layers
  if "lm_head" in shapes:
    out["lm_head"] = quantised({"layers": [], "lm_head": make(shapes["lm_head"])})["lm_head"]
  jax.block_until_ready(out)
  return {k: out[k] for k in ("embed", "final_norm", "lm_head", "layers") if k in out}


def _random_weight(seed, shape):
  """One bf16 weight of `shape`: norms (1-D) near 1 so activations stay well scaled
  (1 + 0.1 u), matrices 0.02 u, u of unit variance (uniform, from `_hash_bits`)."""
  import jax
  import jax.numpy as jnp
  f = _WEIGHT_FNS.get(shape)
  if f is None:
    def f(seed):
      u = _uniform(_hash_bits(shape, seed)) / UNIFORM_STD
      return ((1.0 + 0.1 * u) if len(shape) == 1 else 0.02 * u).astype(jnp.bfloat16)
    f = _WEIGHT_FNS[shape] = jax.jit(f)
  return f(jnp.uint32(seed))


_WEIGHT_FNS: dict = {}


def resolve_paths(args) -> list[str]:
  """--paths, or plain / mesh (--mesh) / cp (--mesh --context-parallel)."""
  if args.paths:
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    bad = [p for p in paths if p not in PATHS]
    if bad or not paths:
      raise SystemExit(f"--paths {args.paths!r}: choose from {', '.join(PATHS)}")
    if args.context_parallel and "cp" not in paths:
      paths.append("cp")
  elif args.mesh:
    paths = ["cp" if args.context_parallel else "mesh"]
  else:
    paths = ["cp"] if args.context_parallel else ["plain"]
  return list(dict.fromkeys(paths))


def mesh_spec(args) -> str:
  return (args.mesh or "sequence=1").replace(" ", "")


def build_mesh(spec: str):
  """The mesh of `spec` over the first devices it needs (a mesh of one device on a
  machine of several is allowed: that is the point of sequence=1 here)."""
  import jax
  from duojax import sharding
  n = math.prod(sharding.parse_mesh(spec).values())
  if n > jax.device_count():
    raise SystemExit(f"--mesh {spec} needs {n} devices, this machine has "
                     f"{jax.device_count()}")
  return sharding.make_mesh(spec, jax.devices()[:n])


def path_label(path: str, backend: str, spec: str) -> str:
  return f"duojax-{backend}" if path == "plain" else f"duojax-{backend} {path} {spec}"


def backend_label(be) -> str:
  """A backend name, or ContextParallel(per-device backend) for the context-parallel one."""
  return be if isinstance(be, str) else f"{type(be).__name__}({getattr(be, 'backend', '?')})"


def device_bytes(tree, dev) -> int:
  """Bytes of `tree`'s arrays that live on device `dev`."""
  import jax
  total = 0
  for x in jax.tree_util.tree_leaves(tree):
    for s in x.addressable_shards:
      if s.device == dev:
        total += s.data.nbytes
  return total


class Prepared:
  """One compiled decode loop and what it runs on: handle, cache, hidden, key."""

  def __init__(self, compiled, handle, cache, hidden, key, be):
    self.compiled, self.handle, self.cache, self.hidden, self.key = (compiled, handle, cache,
                                                                     hidden, key)
    self.be = be
    try:
      self.temp = compiled.memory_analysis().temp_size_in_bytes
    except Exception:  # noqa: BLE001 - not every backend reports it
      self.temp = 0

  def run(self, ctx: int, reps: int = 3):
    """Median ms/token over `reps` calls after a warm-up one, with every row's length set
    to ctx; returns (ms, tokens [B, steps] of the last call as numpy)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from duojax import cache as kvc
    b = self.cache.lengths.shape[0]
    ts = []
    out = None
    for rep in range(reps + 1):
      lengths = jax.device_put(jnp.full((b,), ctx, jnp.int32), self.cache.lengths.sharding)
      self.cache = kvc.KVCache(self.cache.layers, lengths)
      jax.block_until_ready(self.cache)
      t0 = time.perf_counter()
      out, steps, self.cache = self.compiled(self.handle, self.cache, self.hidden, self.key)
      jax.block_until_ready(out)
      if rep:  # the first call warms up
        ts.append((time.perf_counter() - t0) / int(steps))
    return statistics.median(ts) * 1e3, np.asarray(out)


def prepare(path, config, params, mask, batch, capacity, kv_dtype, steps, backend, mesh=None):
  """Builds the handle for `mask`, the cache and the compiled decode loop of one path.
  plain: engine.decode on one device, as before. mesh: engine.place_on_mesh and the
  backend of engine.mesh_backend (what engine.mesh_decode runs). cp: the same placement
  with ContextParallel(mesh, backend) forced."""
  import jax
  import jax.numpy as jnp
  from duojax import engine
  from duojax import sharding
  from duojax.model import handle as model_handle
  # Random weights: the head reordering DuoAttention applies to real weights
  # (llama.apply_head_mask) permutes random values into random values, so it is skipped.
  h = model_handle.from_params(config, params, mask, reordered=True)
  key = jax.random.PRNGKey(0)
  sampling = engine.SamplingSettings()
  if path == "plain":
    cache = random_cache(config, batch, capacity, mask, kv_dtype=kv_dtype)
    hidden = jax.random.normal(jax.random.PRNGKey(7), (batch, config.hidden_size), jnp.bfloat16)
    compiled = engine.decode.lower(h, config, cache, hidden, key, steps, sampling, (),
                                   backend).compile()
    return Prepared(compiled, h, cache, hidden, key, backend)
  from duojax import context_parallel
  abstract = cache_shapes(config, batch, capacity, mask, kv_dtype)
  cache = random_cache(config, batch, capacity, mask, kv_dtype=kv_dtype,
                       shardings=sharding.cache_shardings(abstract, mesh))
  h, cache, pl = engine.place_on_mesh(mesh, h, config, cache)
  if path == "cp":
    be = context_parallel.ContextParallel(mesh, backend=backend)
  else:
    be = engine.mesh_backend(mesh, backend, cache)
  hidden = jax.device_put(
      jax.random.normal(jax.random.PRNGKey(7), (batch, config.hidden_size), jnp.bfloat16),
      pl.hidden)
  key = jax.device_put(key, pl.replicated)

  def dec(model, cache, last_hidden, key):  # engine.mesh_decode's program, any backend
    return engine.decode(model, config, cache, last_hidden, key, steps, sampling, (), be)
  compiled = jax.jit(dec, in_shardings=(pl.model, pl.cache, pl.hidden, pl.replicated),
                     out_shardings=(pl.tokens, pl.replicated, pl.cache),
                     donate_argnums=(1,)).lower(h, cache, hidden, key).compile()
  return Prepared(compiled, h, cache, hidden, key, be)


def cache_shapes(config, batch, capacity, mask, kv_dtype):
  """The cache's ShapeDtypeStructs (nothing allocated): to lower against, or to fill."""
  import jax
  import jax.numpy as jnp
  from duojax import cache as kvc
  return jax.eval_shape(lambda: kvc.init_cache(config, batch, capacity, mask, jnp.bfloat16,
                                               kv_dtype=kv_dtype))


def is_oom(e: BaseException) -> bool:
  s = f"{type(e).__name__}: {e}"
  return any(w in s for w in ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory",
                              "OutOfMemory", "Resource exhausted", "CUDA_ERROR_OUT_OF_MEMORY"))


def free_device_memory():
  """After a failed try: drop compiled programs and their buffers before the next one."""
  import jax
  gc.collect()
  jax.clear_caches()
  gc.collect()


def setups_for(args, name, config):
  """(batch, mask, label, backend suffix) of one model: full and duo at each sparsity at
  batch 1, --unfused, and full + the first sparsity at the batch sizes > 1."""
  sps = sparsities(args, name)
  setups = [(1, None, "full")] + [(1, random_mask(config, float(s)), f"duo-{s}") for s in sps]
  if args.unfused:  # the same masks through the two decode ops + concatenation
    setups += [(1, random_mask(config, float(sps[0])), f"duo-{sps[0]}-unfused")]
  for b in batches(args):
    if b > 1 and (name in args.multi_batch_models.split(",") or args.smoke):
      setups += [(b, None, "full"), (b, random_mask(config, float(sps[0])), f"duo-{sps[0]}")]
  keep = config_filter(args)
  return [s for s in setups if keep is None or s[2] in keep]


def config_filter(args):
  """--configs as a set of labels (full, duo-0.5, duo-0.5-unfused), or None: all."""
  return None if not args.configs else {c.strip() for c in args.configs.split(",") if c.strip()}


def device_limit(args):
  """(bytes the search may use, the device's bytes_limit or None, --mem-limit-GiB in bytes
  or None)."""
  import jax
  stats = jax.devices()[0].memory_stats() or {}
  dev = stats.get("bytes_limit")
  cap = int(args.mem_limit_GiB * GiB) if args.mem_limit_GiB else None
  known = [x for x in (dev, cap) if x]
  return (min(known) if known else None), dev, cap


def run_jax(args, copy_GBps):
  import jax
  from duojax import cache as kvc
  from duojax import sharding

  limit = device_limit(args)[0] or 16 * GiB
  paths = resolve_paths(args)
  spec = mesh_spec(args)
  mesh = build_mesh(spec) if any(p != "plain" for p in paths) else None
  n_dev = 1 if mesh is None else mesh.size
  kv_dtypes = dtype_list(args.kv_dtype, KV_DTYPES, "--kv-dtype")
  # bf16 first: the int8 weights are built after the bf16 ones are dropped
  wds = sorted(dtype_list(args.weights_dtype, WEIGHT_DTYPES, "--weights-dtype"),
               key=WEIGHT_DTYPES.index)
  max_b = parse_context(args.max_batch_ctx)
  rows = []

  def emit(row):
    rows.append(row)
    print("[jax]", json.dumps({k: v for k, v in row.items() if k != "tokens"}), flush=True)
    if args.partial:
      Path(args.partial).write_text(json.dumps(rows))

  for name, config in selected_models(args).items():
    params = None
    for wd in wds:
      params = None  # the previous weights go before the next are made
      gc.collect()
      t0 = time.perf_counter()
      params = build_params(config, wd, pack=not args.no_pack)
      w_alloc = weights_alloc(params)
      print(f"[jax] {name}: {wd} weights {w_alloc / 1e9:.2f} GB in "
            f"{time.perf_counter() - t0:.1f}s", flush=True)
      for batch, mask, label in setups_for(args, name, config):
        unfused = label.endswith("-unfused")
        backend = unfused_backend(args.backend) if unfused else args.backend
        ctxs = [c for c in contexts(args) if batch == 1 or c <= max_b or args.smoke]
        for kvd in kv_dtypes:
          for path in paths:
            if path == "cp" and unfused:
              continue  # context parallelism never runs the fused op: nothing to compare
            impl = path_label(path, args.backend, spec)
            base = {"model": name, "impl": impl, "path": path,
                    "mesh": None if path == "plain" else spec, "config": label, "batch": batch,
                    "kv_dtype": kvd, "weights_dtype": wd}
            share = 1 if path == "plain" else n_dev
            need = lambda c: (w_alloc + kvc.kv_cache_bytes(config, mask, c, batch,
                                                           kv_dtype=kvd)) / share
            fits = [c for c in ctxs if need(c + args.steps + 16) + 4 * GiB < limit]
            for c in ctxs:
              if c not in fits:
                emit({**base, "ctx": c, "error": f"does not fit: needs {need(c) / 1e9:.0f} GB "
                                                 f"of {limit / 1e9:.0f} GB"})
            if not fits:
              continue
            mult = math.lcm(16, sharding.capacity_multiple(mesh) if path != "plain" else 1)
            capacity = -(-(max(fits) + args.steps + 16) // mult) * mult
            t0 = time.perf_counter()
            try:
              prep = prepare(path, config, params, mask, batch, capacity, kvd, args.steps,
                             backend, mesh)
            except Exception as e:  # noqa: BLE001 - one failed path must not end the run
              for c in fits:
                emit({**base, "ctx": c, "error": ("OOM: " if is_oom(e) else "")
                      + f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"})
              free_device_memory()
              continue
            compile_s = time.perf_counter() - t0
            dev0 = jax.devices()[0] if mesh is None else mesh.devices.flat[0]
            w_dev = w_alloc if path == "plain" else device_bytes(prep.handle.state, dev0)
            c_frac = 1.0 if path == "plain" else (device_bytes(prep.cache, dev0)
                                                  / kvc.cache_nbytes(prep.cache))
            wb = weight_bytes_read(config, params, batch)
            for ctx in fits:
              try:
                ms, toks = prep.run(ctx)
              except Exception as e:  # noqa: BLE001 - e.g. OOM at run time: next setup
                emit({**base, "ctx": ctx, "error": ("OOM: " if is_oom(e) else "")
                      + f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"})
                prep = None
                free_device_memory()
                break
              kb = kv_bytes_read(config, mask, ctx, batch, kv_item(config, kvd))
              floor = (wb + kb) / (copy_GBps * 1e9) * 1e3
              cache_b = kvc.kv_cache_bytes(config, mask, ctx, batch, kv_dtype=kvd)
              emit({**base, "ctx": ctx, "ms_per_token": ms, "tokens_per_s": batch / ms * 1e3,
                    "floor_ms": floor, "x_floor": ms / floor, "weight_bytes": wb,
                    "kv_bytes_read": kb, "kv_cache_GB": cache_b / 1e9,
                    "weights_GB": w_alloc / 1e9,
                    "peak_GB": (w_dev + cache_b * c_frac + prep.temp) / 1e9,
                    "xla_temp_GB": prep.temp / 1e9, "compile_s": compile_s,
                    "capacity": capacity, "attention_backend": backend_label(prep.be),
                    "tokens": [int(t) for t in toks[0]]})
            del prep
            gc.collect()
    del params
  return rows


def backend_without(name: str, drop: tuple[str, ...], tag: str) -> str:
  """A copy of the backend without the ops `drop` (dispatch then takes its other routes),
  registered as NAME-TAG."""
  from duojax.attention import dispatch
  name = dispatch.resolve_backend(name)
  ops = {k: v for k, v in dispatch.backend_ops(name).items() if k not in drop}
  dispatch.register_backend(f"{name}-{tag}", ops)
  return f"{name}-{tag}"


def unfused_backend(name: str) -> str:
  """Without the fused `duo_decode` ops (with and without the cache write): dispatch runs
  the retrieval and streaming decode ops separately."""
  return backend_without(name, ("duo_decode", "duo_decode_write"), "unfused")


def batches(args):
  return [int(b) for b in args.batches.split(",")]


def sparsities(args, model):
  """--sparsities "0.5,0.75" for every model, or "llama3-8b:0.5,0.75;llama2-7b:0.75"."""
  spec = args.sparsities
  if ":" not in spec:
    return spec.split(",")
  table = dict(part.split(":") for part in spec.split(";"))
  return table.get(model, next(iter(table.values()))).split(",")


# -- capacity -------------------------------------------------------------------------------

HEADROOM = 0.02  # of the limit: the allocator's rounding and fragmentation, small buffers
TEMP_RESERVE = 0.01  # of the limit: room for the step's temp in the first compile's capacity
RECOMPILE_GAIN = 0.005  # recompile for a larger first try only if it gains more than this


def estimate_capacity(config, mask, batch, kv_dtype, base_bytes, temp, limit, steps,
                      headroom=HEADROOM) -> int:
  """The largest capacity (a multiple of 16, >= steps + 32) whose cache fits with
  `base_bytes` (the weights) and the step's temp under limit * (1 - headroom); 0 if none
  does. temp: bytes, or a function of the capacity (an affine fit of two compiles)."""
  from duojax import cache as kvc
  temp_at = temp if callable(temp) else (lambda c: temp)
  budget = limit * (1 - headroom) - base_bytes

  def fits(c):
    return kvc.kv_cache_bytes(config, mask, c, batch, kv_dtype=kv_dtype) + temp_at(c) <= budget
  lo, hi = 0, 1
  while fits(hi * 16):
    lo, hi = hi, hi * 2
    if hi > 1 << 32:
      raise ValueError("the cache fits at any capacity: is the memory limit right?")
  while hi - lo > 1:  # fits(lo * 16) (or lo = 0), not fits(hi * 16)
    mid = (lo + hi) // 2
    lo, hi = (mid, hi) if fits(mid * 16) else (lo, mid)
  cap = lo * 16
  return cap if cap >= steps + 32 else 0


def capacity_jobs(args) -> list[dict]:
  jobs = []
  for name, config in selected_models(args).items():
    for wd in dtype_list(args.weights_dtype, WEIGHT_DTYPES, "--weights-dtype"):
      for kvd in dtype_list(args.kv_dtype, KV_DTYPES, "--kv-dtype"):
        for b in batches(args):
          for s in [None] + sparsities(args, name):
            label = "full" if s is None else f"duo-{s}"
            if config_filter(args) is None or label in config_filter(args):
              jobs.append({"model": name, "weights_dtype": wd, "kv_dtype": kvd, "batch": b,
                           "sparsity": s, "config": label})
  if not jobs:
    raise SystemExit("--capacity: no (model, config) left; check --configs against "
                     "--sparsities (labels: full, duo-S)")
  return jobs


def capacity_worker(args, job: dict) -> dict:
  """One (model, weights, KV dtype, batch, config): the longest context that decodes."""
  import jax
  import jax.numpy as jnp
  from duojax import cache as kvc
  from duojax import engine
  from duojax.attention import dispatch
  from duojax.model import handle as model_handle

  backend = dispatch.resolve_backend(args.backend)
  dev = jax.devices()[0]
  limit, dev_limit, cap = device_limit(args)
  if limit is None:
    raise SystemExit("this device reports no memory limit (memory_stats() is empty, e.g. a "
                     "CPU): pass --mem-limit-GiB")
  copy = args.copy_GBps or copy_bandwidth(2 * GiB if jax.default_backend() == "gpu" else 2**24)
  config = model_configs(args.smoke)[job["model"]]
  mask = None if job["sparsity"] is None else random_mask(config, float(job["sparsity"]))
  batch, kvd, steps = job["batch"], job["kv_dtype"], args.steps
  t0 = time.perf_counter()
  params = build_params(config, job["weights_dtype"], pack=not args.no_pack)
  h = model_handle.from_params(config, params, mask, reordered=True)
  w_alloc, wb = weights_alloc(params), weight_bytes_read(config, params, batch)
  del params
  gc.collect()
  stats = lambda: dev.memory_stats() or {}
  base = stats().get("bytes_in_use", w_alloc)  # the weights and whatever else is resident
  build_s = time.perf_counter() - t0
  hidden = jax.random.normal(jax.random.PRNGKey(7), (batch, config.hidden_size), jnp.bfloat16)
  key = jax.random.PRNGKey(0)
  sampling = engine.SamplingSettings()

  def compile_at(capacity):
    shapes = cache_shapes(config, batch, capacity, mask, kvd)
    t = time.perf_counter()
    c = engine.decode.lower(h, config, shapes, hidden, key, steps, sampling, (),
                            backend).compile()
    try:
      temp = c.memory_analysis().temp_size_in_bytes
    except Exception:  # noqa: BLE001
      temp = 0
    return c, temp, time.perf_counter() - t

  result = {**job, "impl": f"duojax-{backend}", "device": getattr(dev, "device_kind", str(dev)),
            "jax": jax.__version__, "limit_bytes": limit,
            "device_bytes_limit": dev_limit, "mem_limit_bytes": cap, "weights_bytes": w_alloc,
            "resident_before_bytes": base, "copy_GBps": copy, "steps": steps,
            "build_s": build_s, "tries": []}
  compiled = temp = None  # a program compiled for `capacity` already, and its temp
  if args.capacity_start:
    capacity = -(-(parse_context(args.capacity_start) + steps + 16) // 16) * 16
    result["start"] = "--capacity-start"
  else:  # the estimate: weights + cache + the temp of the compiled step
    est = lambda t: estimate_capacity(config, mask, batch, kvd, base, t, limit, steps)
    # First compile for the capacity that leaves TEMP_RESERVE for temp: where the real
    # temp is at most that (an accelerator's is ~0.5 GB for an 8B model, nearly constant
    # in the capacity), this compile is also the first try's and costs nothing more.
    reserve = TEMP_RESERVE * limit
    guess = est(reserve)
    if not guess:
      result["error"] = "the weights alone leave no room for a cache under the limit"
      return result
    compiled, temp, _ = compile_at(guess)
    capacity = est(temp)
    result["start"] = "estimate"
    result["estimate_temp_bytes"] = temp
    if capacity < guess and temp > 0.05 * limit:
      # temp is a real share here and may grow with the capacity (the CPU compiler holds
      # fp32 copies of the cache, dequantised ones of an int4 cache): fit it as affine in
      # the capacity from a second compile, which may also be the first try's program
      c_b = capacity or max(16 * -(-(steps + 32) // 16), guess // 32 * 16)
      compiled, temp_b, _ = compile_at(c_b)
      slope = max(0.0, (temp - temp_b) / (guess - c_b))
      fit = lambda c, c0=c_b, t0=temp_b: t0 + slope * (c - c0)
      capacity = est(fit)
      result["estimate_temp_fit"] = {"bytes_at": [[guess, temp], [c_b, temp_b]],
                                     "bytes_per_slot": slope}
      temp = temp_b
      if capacity != c_b:
        compiled = None
    elif capacity < guess or capacity > guess * (1 + RECOMPILE_GAIN):
      compiled = None  # a smaller cache is needed, or a larger one is worth a compile
    else:
      capacity = guess  # within RECOMPILE_GAIN of the best: keep the program compiled
    if not capacity:
      result["error"] = ("the weights and the step's temporaries leave no room for a cache "
                         "under the limit")
      return result
  best = None
  for i in range(args.capacity_tries):
    ctx = capacity - steps - 16
    if ctx < 1:
      break
    rec = {"capacity": capacity, "ctx": ctx}
    cache = prep = None
    try:
      if compiled is None:
        compiled, temp, rec["compile_s"] = compile_at(capacity)
      cache_b = kvc.kv_cache_bytes(config, mask, capacity, batch, kv_dtype=kvd)
      rec.update(cache_bytes=cache_b, temp_bytes=temp, estimate_bytes=base + cache_b + temp)
      if cap and rec["estimate_bytes"] > cap:
        rec["error"] = f"estimate {rec['estimate_bytes'] / GiB:.3f} GiB over --mem-limit-GiB"
      else:
        peak_before = stats().get("peak_bytes_in_use")
        cache = random_cache(config, batch, capacity, mask, kv_dtype=kvd)
        jax.block_until_ready(cache)
        prep = Prepared(compiled, h, cache, hidden, key, backend)
        cache = None
        ms, toks = prep.run(ctx)
        st = stats()
        rec.update(ms_per_token=ms, tokens=[int(t) for t in toks[0]],
                   peak_bytes_in_use=st.get("peak_bytes_in_use"),
                   bytes_in_use=st.get("bytes_in_use"))
        # the peak counter is the process's: it is this try's only if this try raised it
        clean = (peak_before is not None and rec["peak_bytes_in_use"] is not None
                 and rec["peak_bytes_in_use"] > peak_before)
        rec["peak_is_this_try"] = clean
        if cap and clean and rec["peak_bytes_in_use"] > cap:
          rec["error"] = (f"peak {rec['peak_bytes_in_use'] / GiB:.3f} GiB over "
                          "--mem-limit-GiB")
    except Exception as e:  # noqa: BLE001 - OOM backs off; anything else ends the search
      rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
      if not is_oom(e):
        result["tries"].append(rec)
        result["error"] = rec["error"]
        break
      rec["oom"] = True
    finally:
      prep = cache = compiled = None
      free_device_memory()
    result["tries"].append(rec)
    print("[capacity]", json.dumps({k: v for k, v in rec.items() if k != "tokens"}), flush=True)
    if "error" not in rec:
      best = rec
      break
    capacity = (int(capacity * (1 - args.capacity_backoff)) // 16) * 16
  if best is not None:
    kb = kv_bytes_read(config, mask, best["ctx"], batch, kv_item(config, kvd))
    floor = (wb + kb) / (copy * 1e9) * 1e3
    result.update(ctx=best["ctx"], capacity=best["capacity"], ms_per_token=best["ms_per_token"],
                  tokens_per_s=batch / best["ms_per_token"] * 1e3, floor_ms=floor,
                  x_floor=best["ms_per_token"] / floor, weight_bytes=wb, kv_bytes_read=kb,
                  peak_bytes_in_use=best.get("peak_bytes_in_use"),
                  estimate_bytes=best["estimate_bytes"], tokens=best["tokens"])
  elif "error" not in result:
    result["error"] = f"no context decoded in {len(result['tries'])} tries"
  return result


def run_capacity(args, out: Path) -> list[dict]:
  """Each job in a child process: a clean device (no buffers or fragments left by the
  previous job, nothing held by this process) and a peak counter of its own."""
  if args.mesh or args.paths or args.context_parallel:
    raise SystemExit("--capacity runs the plain path on one device; drop --mesh/--paths/"
                     "--context-parallel")
  rows = []
  for i, job in enumerate(capacity_jobs(args)):
    res = out / f"capacity_job_{i}.json"
    res.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "infer.bench_decode", *args.argv, "--capacity-worker",
           json.dumps(job), "--capacity-result", str(res)]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=dict(os.environ))
    if res.exists():
      row = json.loads(res.read_text())
    else:
      row = {**job, "error": f"the child exited with code {r.returncode} and wrote nothing"}
    row["wall_s"] = time.perf_counter() - t0
    print("[capacity]", json.dumps({k: v for k, v in row.items() if k not in ("tries", "tokens")}),
          flush=True)
    rows.append(row)
    (out / "bench_capacity_partial.json").write_text(json.dumps(rows))
  return rows


def summarize_capacity(rows, meta) -> str:
  lines = [f"Device {meta.get('device')}, {meta['date']}; `{meta['command']}`", "",
           "| model | weights | KV | B | config | longest ctx | tokens | ms/token | floor ms "
           "| x floor | peak GiB | estimate GiB | limit GiB | tries |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    head = (f"| {r['model']} | {r['weights_dtype']} | {r['kv_dtype']} | {r['batch']} | "
            f"{r['config']} |")
    n = len(r.get("tries", []))
    if "ms_per_token" not in r:
      lines.append(f"{head} {r.get('error', '-')} | | | | | | | | {n} |")
      continue
    peak = r.get("peak_bytes_in_use")
    lim = r.get("limit_bytes")
    lines.append(f"{head} {kfmt(r['ctx'])} | {r['ctx']} | {r['ms_per_token']:.2f} | "
                 f"{r['floor_ms']:.2f} | {r['x_floor']:.2f} | "
                 f"{'-' if peak is None else f'{peak / GiB:.2f}'} | "
                 f"{r['estimate_bytes'] / GiB:.2f} | "
                 f"{'-' if lim is None else f'{lim / GiB:.2f}'} | {n} |")
  return "\n".join(lines) + "\n"


# -- report ----------------------------------------------------------------------------------

def _variant(r) -> tuple:
  """What a row measured apart from the attention config (rows of older runs: defaults)."""
  return (r.get("impl", ""), r.get("kv_dtype") or "bf16", r.get("weights_dtype") or "bf16")


def summarize(rows, hf_rows, meta):
  lines = [f"Device {meta['device']}, {meta['date']}; copy {meta['copy_GBps']:.0f} GB/s "
           f"(read + write); `{meta['command']}`", "",
           "| model | impl | B | ctx | config | KV | weights | ms/token | floor ms | x floor "
           "| peak GB | HF ms/token | HF / ours | peer ms/token | peer / ours |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  hf = {(r["model"], r["batch"], r["ctx"]): r for r in hf_rows
        if r.get("impl", "").startswith("hf")}
  peer = {(r["model"], r["batch"], r["ctx"]): r for r in hf_rows
          if r.get("impl", "").startswith("torch")}

  def other(table, r):
    h = table.get((r["model"], r["batch"], r["ctx"]))
    hs = "-" if h is None else (f"{h['ms_per_token']:.2f}" if "ms_per_token" in h else "OOM")
    ratio = (f"{h['ms_per_token'] / r['ms_per_token']:.2f}x"
             if h and "ms_per_token" in h and "ms_per_token" in r else "-")
    return hs, ratio

  for r in rows:
    (hs, hr), (ps, pr) = other(hf, r), other(peer, r)
    impl, kv, wd = _variant(r)
    head = (f"| {r['model']} | {impl} | {r['batch']} | {kfmt(r['ctx'])} | {r['config']} | "
            f"{kv} | {wd} |")
    if "ms_per_token" not in r:
      lines.append(f"{head} {r.get('error', '-')} | | | | {hs} | | {ps} | |")
      continue
    lines.append(f"{head} {r['ms_per_token']:.2f} | {r['floor_ms']:.2f} | {r['x_floor']:.2f} | "
                 f"{r['peak_GB']:.1f} | {hs} | {hr} | {ps} | {pr} |")
  ok = [r for r in rows if "ms_per_token" in r]
  at = lambda r: (r["model"], r["batch"], r["ctx"])

  def compare(title, same, base_of, verb, tokens=False):
    """Lines 'row: X.XXx verb' against the row `base_of(r)` names, where one exists;
    tokens: also whether both decoded the same greedy tokens (only where the two ran on
    the same weights and cache values: paths, weights dtypes)."""
    table = {same(r): r for r in ok}
    out = []
    for r in ok:
      b = base_of(r)
      if b is None or b not in table or table[b] is r:
        continue
      f = table[b]
      note = token_note(r, f) if tokens else ""
      impl, kv, wd = _variant(r)
      out.append(f"{r['model']} B={r['batch']} {kfmt(r['ctx'])} {r['config']} {impl} KV {kv} "
                 f"weights {wd}: {f['ms_per_token'] / r['ms_per_token']:.2f}x {verb}{note}")
    return ["", title, ""] + [f"- {s}" for s in out] if out else []

  key = lambda r: at(r) + (r["config"],) + _variant(r)
  lines += compare("Speed-up over own full attention:", key,
                   lambda r: (at(r) + ("full",) + _variant(r)
                              if r["config"].startswith("duo") else None), "faster than full")
  lines += compare("Mesh / context-parallel paths against the plain path (same run):", key,
                   lambda r: (at(r) + (r["config"], path_base(r["impl"])) + _variant(r)[1:]
                              if r.get("path", "plain") != "plain" else None),
                   "the plain path's speed", tokens=True)
  lines += compare("Quantised KV cache against the bf16 cache:", key,
                   lambda r: (at(r) + (r["config"], r.get("impl", ""), "bf16",
                                       _variant(r)[2]) if _variant(r)[1] != "bf16" else None),
                   "the bf16 cache's speed")
  lines += compare("int8 weights against bf16 weights:", key,
                   lambda r: (at(r) + (r["config"],) + _variant(r)[:2] + ("bf16",)
                              if _variant(r)[2] != "bf16" else None), "the bf16 weights' speed",
                   tokens=True)
  return "\n".join(lines) + "\n"


def token_note(r, f) -> str:
  """Whether two rows decoded the same greedy tokens (row 0), and if not, from which step."""
  a, b = r.get("tokens"), f.get("tokens")
  if a is None or b is None:
    return ""
  if a == b:
    return "; same greedy tokens"
  first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
  return f"; greedy tokens differ from step {first}"


def path_base(impl: str) -> str:
  """'duojax-gpu mesh sequence=1' -> 'duojax-gpu' (the plain path's impl)."""
  return impl.split(" ")[0]


def plot(rows, hf_rows, path):
  """One panel per model and batch size: ms per token against context, each configuration
  beside its floor (dotted) and the PyTorch peers (gray)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  panels = sorted({(r["model"], r["batch"]) for r in rows if "ms_per_token" in r}) or \
      sorted({(r["model"], 1) for r in rows})
  fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
  for ax, (m, b) in zip(axes[0], panels):
    groups = {}
    for r in rows:
      if r["model"] == m and r["batch"] == b and "ms_per_token" in r:
        impl, kv, wd = _variant(r)
        parts = [r["config"]] + ([impl] if r.get("path", "plain") != "plain" else [])
        parts += ([f"KV {kv}"] if kv != "bf16" else []) + ([f"w {wd}"] if wd != "bf16" else [])
        groups.setdefault(" ".join(parts), []).append((r["ctx"], r["ms_per_token"],
                                                        r["floor_ms"]))
    for cfg, pts in sorted(groups.items()):
      pts.sort()
      line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"duojax {cfg}")
      ax.plot([p[0] for p in pts], [p[2] for p in pts], ":x", color=line.get_color(),
              markersize=5, label=f"floor {cfg}")  # x: a lone context still shows its floor
    for impl, style, label in (("hf", "s--", "HF sdpa (eager)"),
                               ("torch", "^--", "torch sdpa + CUDA graph")):
      hp = sorted((r["ctx"], r["ms_per_token"]) for r in hf_rows
                  if r["model"] == m and r.get("batch", 1) == b and "ms_per_token" in r
                  and r.get("impl", "").startswith(impl))
      if hp:
        ax.plot([p[0] for p in hp], [p[1] for p in hp], style, color="gray", label=label,
                alpha=1.0 if impl == "torch" else 0.6)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel(f"ms / token (batch {b})")
    ax.set_title(f"{m}, batch {b}")
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def rerender(args, out):
  """Re-renders a saved run's table and plot, optionally against another copy bandwidth
  (--copy-GBps, e.g. torch's copy measured on the same machine by bench_kernels)."""
  d = json.loads(Path(args.report_from).read_text())
  meta, rows, hf_rows = d["meta"], d["rows"], d.get("hf", [])
  if args.copy_GBps:
    meta["copy_GBps_measured_in_run"] = meta["copy_GBps"]
    meta["copy_GBps"] = args.copy_GBps
    for r in rows:
      if "ms_per_token" in r:
        r["floor_ms"] = (r["weight_bytes"] + r["kv_bytes_read"]) / (args.copy_GBps * 1e9) * 1e3
        r["x_floor"] = r["ms_per_token"] / r["floor_ms"]
  (out / "bench_decode.json").write_text(json.dumps({"meta": meta, "rows": rows,
                                                     "hf": hf_rows}, indent=1))
  table = summarize(rows, hf_rows, meta)
  (out / "bench_decode.md").write_text(table)
  plot(rows, hf_rows, out / "bench_decode.png")
  print(table)


def parse_quant_decode_config(text: str) -> dict:
  """--quant-decode-config's JSON -> {bits: overrides}; a clear error for anything else."""
  from duojax.kernels.gpu.decode import DECODE_CONFIG
  try:
    raw = json.loads(text)
  except json.JSONDecodeError as e:
    raise SystemExit(f"--quant-decode-config: not JSON ({e}); e.g. "
                     '\'{"4": {"block_n": 128, "num_warps": 8}}\'') from None
  if not isinstance(raw, dict):
    raise SystemExit("--quant-decode-config: a JSON object of code widths, e.g. "
                     '\'{"4": {"block_n": 128}}\'')
  out = {}
  for bits, cfg in raw.items():
    if str(bits) not in ("8", "4", "k8v4") or not isinstance(cfg, dict):
      raise SystemExit(f"--quant-decode-config: keys are code widths 8 or 4 (or k8v4, the "
                       f"mixed cache), each an object; got {bits!r}: {cfg!r}")
    known = set(DECODE_CONFIG) | {"f16_codes"}
    bad = sorted(set(cfg) - known)
    if bad:
      raise SystemExit(f"--quant-decode-config: unknown keys {bad}; known: {sorted(known)}")
    out[(8, 4) if bits == "k8v4" else int(bits)] = cfg
  return out


def build_parser():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", required=True)
  ap.add_argument("--models", default=None,
                  help="comma list (default: llama3-8b,llama2-7b; with --smoke the tiny ones)")
  ap.add_argument("--contexts", default=None,
                  help=f"comma list; a plain number is K tokens (default {DEFAULT_CONTEXTS}); "
                       "suffixes K, M (binary: 1M = 1048576, 3.3M = 3460301), t = exact tokens")
  ap.add_argument("--batches", default="1,8")
  ap.add_argument("--max-batch-ctx", default="32",
                  help="longest context for batch > 1 (K tokens, or 128K, 1M, ...)")
  ap.add_argument("--sparsities", default="llama3-8b:0.5,0.75;llama2-7b:0.75",
                  help='"0.5,0.75" for all models, or per model "m1:0.5,0.75;m2:0.75"')
  ap.add_argument("--configs", default=None,
                  help="only these configs, e.g. duo-0.5,duo-0.75 (labels: full, duo-S, "
                       "duo-S-unfused); default: all that --sparsities/--unfused make")
  ap.add_argument("--multi-batch-models", default="llama3-8b",
                  help="models also run at the batch sizes > 1 of --batches (full and the "
                       "first sparsity, contexts <= --max-batch-ctx)")
  ap.add_argument("--steps", type=int, default=16)
  ap.add_argument("--backend", default="auto")
  ap.add_argument("--kv-dtype", default="bf16",
                  help="duojax's KV cache, a comma list of bf16, int8, int4, k8v4 (codes + float32 "
                       "scale and zero per token per KV head; the floor counts those bytes)")
  ap.add_argument("--no-pack", action="store_true",
                  help="serve q/k/v and gate/up as separate weights (default: packed, one "
                       "product each, as serving.load_model does; duojax/model/pack.py)")
  ap.add_argument("--weights-dtype", default="bf16",
                  help="comma list of bf16, int8 (weight-only int8 projections through qwix; "
                       "the floor counts codes + scales)")
  ap.add_argument("--paths", default=None,
                  help="comma list of plain (one device, today's path), mesh (on --mesh via "
                       "engine.place_on_mesh / mesh_backend), cp (ContextParallel forced on "
                       "--mesh, also of one device); default plain, or mesh with --mesh")
  ap.add_argument("--mesh", default=None,
                  help="mesh of the mesh/cp paths, e.g. sequence=1, tensor=1, sequence=8 "
                       "(its first devices; default sequence=1)")
  ap.add_argument("--context-parallel", action="store_true",
                  help="add the cp path (with --mesh alone: run cp instead of mesh)")
  ap.add_argument("--mem-limit-GiB", type=float, default=None,
                  help="use at most this much device memory (binary GiB): the fit checks "
                       "and --capacity size for min(this, the device's bytes_limit); a "
                       "capacity try whose estimate or measured peak exceeds it fails. The "
                       "device limit itself is XLA_PYTHON_CLIENT_MEM_FRACTION's")
  ap.add_argument("--capacity", action="store_true",
                  help="find the longest context that decodes per (model, weights, KV dtype, "
                       "batch, config) instead of timing --contexts")
  ap.add_argument("--capacity-start", default=None,
                  help="first context to try (e.g. 3.3M) instead of the estimate")
  ap.add_argument("--capacity-tries", type=int, default=5)
  ap.add_argument("--capacity-backoff", type=float, default=0.03,
                  help="fraction the capacity shrinks by after a failed try")
  ap.add_argument("--unfused", action="store_true",
                  help="also time duo without the fused duo_decode op (batch 1)")
  ap.add_argument("--fold-scales", action="store_true",
                  help="quantised KV: the Triton decode kernels fold each key's scale and zero "
                  "out of the products instead of dequantising every tile, for int8 and int4 "
                  "(`_scan` in duojax/kernels/gpu/decode.py; int8 folds by default, "
                  "QUANT_DECODE_CONFIG); turn it off with --quant-decode-config "
                  "'{\"8\": {\"fold_scales\": false}}'")
  ap.add_argument("--no-fused-write", action="store_true",
                  help="decode writes the new token's keys and values by XLA before the "
                  "attention kernels (two scatters and two ring selects a layer) instead of "
                  "inside their launches (the gpu backend's *_decode_write ops), to time one "
                  "against the other (DUOJAX_FUSED_WRITE=0 takes them out for every program)")
  ap.add_argument("--no-f16-codes", action="store_true",
                  help="quantised KV: the Triton decode kernels convert each code to a float "
                  "for every width (int4 takes fp16 codes by default: QUANT_DECODE_CONFIG), to "
                  "time one against the other")
  ap.add_argument("--quant-decode-config", default=None,
                  help='quantised KV: the split-K decode kernel\'s tuning per code width, JSON '
                  'such as \'{"4": {"block_n": 128, "num_warps": 8}}\' (keys of DECODE_CONFIG; '
                  'replaces QUANT_DECODE_CONFIG in duojax/kernels/gpu/decode.py for that width; '
                  '"k8v4" replaces the mixed cache\'s own entry)')
  ap.add_argument("--sync-every", type=int, default=None,
                  help="decode steps per check that every row stopped (engine.SYNC_EVERY; 1 is "
                  "the loop before it: a host sync every token); time one against the other")
  ap.add_argument("--no-hf", action="store_true", help="skip the PyTorch child (HF and peer)")
  ap.add_argument("--no-peer", dest="peer", action="store_false",
                  help="skip the CUDA-graph PyTorch peer (infer/torch_peer.py) in the child")
  ap.add_argument("--no-hf-eager", dest="hf_eager", action="store_false",
                  help="in the PyTorch child, time only the CUDA-graph peer, not HF eager")
  ap.add_argument("--hf-models", default="llama3-8b,llama2-7b")
  ap.add_argument("--hf-contexts", default="8,32,128,256")
  ap.add_argument("--hf-contexts-mha", default="8,32,64",
                  help="HF contexts for the MHA model (its cache is 4x larger)")
  ap.add_argument("--smoke", action="store_true")
  ap.add_argument("--report-from", help="re-render a saved bench_decode.json (no benchmark)")
  ap.add_argument("--copy-GBps", type=float,
                  help="floor bandwidth: with --report-from, re-render against it; in a run, "
                       "use it instead of measuring")
  ap.add_argument("--hf-worker", action="store_true", help=argparse.SUPPRESS)
  ap.add_argument("--hf-json", help=argparse.SUPPRESS)
  ap.add_argument("--capacity-worker", help=argparse.SUPPRESS)
  ap.add_argument("--capacity-result", help=argparse.SUPPRESS)
  return ap


def _sync_every(args) -> int:
  from duojax import engine
  return args.sync_every or engine.SYNC_EVERY


def check_args(args) -> None:
  """Bad values fail here, before any device work, naming the fix."""
  try:
    for flag in ("contexts", "max_batch_ctx", "capacity_start"):
      v = getattr(args, flag)
      if v is not None:
        parse_contexts(v)
  except ValueError as e:
    raise SystemExit(f"--{flag.replace('_', '-')}: {e}") from None
  dtype_list(args.kv_dtype, KV_DTYPES, "--kv-dtype")
  dtype_list(args.weights_dtype, WEIGHT_DTYPES, "--weights-dtype")
  resolve_paths(args)
  if args.mesh or args.paths or args.context_parallel:
    from duojax import sharding
    try:
      sharding.parse_mesh(mesh_spec(args))
    except sharding.ShardingError as e:
      raise SystemExit(str(e)) from None
  if args.mem_limit_GiB is not None and args.mem_limit_GiB <= 0:
    raise SystemExit("--mem-limit-GiB must be > 0")
  if not 0 < args.capacity_backoff < 1:
    raise SystemExit("--capacity-backoff is a fraction in (0, 1), e.g. 0.03")
  if args.capacity_tries < 1 or args.steps < 1:
    raise SystemExit("--capacity-tries and --steps must be >= 1")
  if args.sync_every is not None and args.sync_every < 1:
    raise SystemExit("--sync-every must be >= 1 (1: a host sync every token)")


def main(argv=None):
  argv = list(sys.argv[1:] if argv is None else argv)
  args = build_parser().parse_args(argv)
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  if args.hf_worker:
    return hf_worker(args)
  if args.report_from:
    return rerender(args, out)
  check_args(args)
  args.argv = argv
  if args.fold_scales:  # before any decode program is traced (capacity children parse it too)
    from duojax.kernels.gpu import decode as kd
    for cfg in kd.QUANT_DECODE_CONFIG.values():
      cfg["fold_scales"] = True
  if args.no_f16_codes:  # read when a launch is planned (decode and prefill kernels)
    from duojax.kernels.gpu import decode as kd
    kd.F16_CODES_DEFAULT = False
    for cfg in kd.QUANT_DECODE_CONFIG.values():
      cfg["f16_codes"] = False
  if args.quant_decode_config:  # the same: read when a decode launch is planned
    from duojax.kernels.gpu import decode as kd
    for bits, cfg in parse_quant_decode_config(args.quant_decode_config).items():
      kd.QUANT_DECODE_CONFIG[bits] = cfg
  if args.no_fused_write:
    args.backend = backend_without(args.backend, ("full_decode_write", "duo_decode_write"),
                                   "nowrite")
  if args.sync_every:  # read when engine.decode is traced
    from duojax import engine
    engine.SYNC_EVERY = args.sync_every
  if args.capacity_worker:
    res = capacity_worker(args, json.loads(args.capacity_worker))
    Path(args.capacity_result).write_text(json.dumps(res, indent=1))
    return 0
  if args.capacity:
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": "python -m infer.bench_decode " + " ".join(argv),
            "mem_fraction": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"),
            "mem_limit_GiB": args.mem_limit_GiB, "steps": args.steps}
    rows = run_capacity(args, out)
    meta["device"] = next((r["device"] for r in rows if "device" in r), None)
    (out / "bench_capacity.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    table = summarize_capacity(rows, meta)
    (out / "bench_capacity.md").write_text(table)
    print(table)
    return 0

  hf_rows = []
  torch_copy = None
  if args.no_hf and not args.smoke and not args.copy_GBps:
    try:
      torch_copy = torch_copy_GBps()
    except Exception as e:  # noqa: BLE001 - torch is optional
      print("torch copy unavailable:", repr(e)[:200])
  if not args.no_hf:
    hf_json = out / "hf_rows.json"
    # the child runs from this process's folder, where `-m infer...` found this module
    cmd = [sys.executable, "-m", "infer.bench_decode", "--hf-worker", "--out", str(out),
           "--hf-json", str(hf_json),
           "--models", args.hf_models, "--steps", "8",
           "--hf-contexts-mha", args.hf_contexts_mha, "--batches", args.batches,
           "--max-batch-ctx", str(args.max_batch_ctx)] + (["--no-peer"] if not args.peer else [])
    cmd += [] if args.hf_eager else ["--no-hf-eager"]
    if args.smoke:
      cmd.append("--smoke")
      if args.contexts:
        cmd += ["--contexts", args.contexts]
    else:
      cmd += ["--contexts", args.hf_contexts]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=dict(os.environ))
    print(f"[hf] done in {time.perf_counter() - t0:.0f}s (rc {r.returncode})", flush=True)
    if hf_json.exists():
      hf = json.loads(hf_json.read_text())
      hf_rows, torch_copy = hf["rows"] + hf.get("peer", []), hf.get("torch_copy_GBps")

  import jax
  from duojax.attention import dispatch
  args.backend = dispatch.resolve_backend(args.backend)
  dev = jax.devices()[0]
  if args.copy_GBps:
    jax_copy = copy = args.copy_GBps
  else:
    jax_copy = copy_bandwidth(2 * GiB if jax.default_backend() == "gpu" else 2**24)
    # The ceiling is the faster of the two copies (torch's clone is a plain cudaMemcpy;
    # XLA's copy of a jitted x.copy() measured ~20% slower on an H100).
    copy = max(jax_copy, torch_copy or 0.0)
  meta = {"device": getattr(dev, "device_kind", str(dev)), "jax": jax.__version__,
          "date": datetime.datetime.now().isoformat(timespec="seconds"),
          "command": "python -m infer.bench_decode " + " ".join(argv),
          "copy_GBps": copy, "jax_copy_GBps": jax_copy, "torch_copy_GBps": torch_copy,
          "backend": args.backend, "steps": args.steps, "kv_dtype": args.kv_dtype,
          "fold_scales": args.fold_scales, "sync_every": _sync_every(args),
          "quant_decode_config": args.quant_decode_config,
          "f16_codes": not args.no_f16_codes, "fused_write": not args.no_fused_write,
          "weights_dtype": args.weights_dtype, "paths": resolve_paths(args),
          "packed_weights": not args.no_pack,
          "mesh": mesh_spec(args) if resolve_paths(args) != ["plain"] else None,
          "device_count": jax.device_count()}
  print(f"# {meta['device']} copy {copy:.0f} GB/s, backend {args.backend}", flush=True)
  args.partial = str(out / "bench_decode_partial.json")
  rows = run_jax(args, copy)
  (out / "bench_decode.json").write_text(json.dumps({"meta": meta, "rows": rows,
                                                     "hf": hf_rows}, indent=1))
  table = summarize(rows, hf_rows, meta)
  (out / "bench_decode.md").write_text(table)
  plot(rows, hf_rows, out / "bench_decode.png")
  print(table)


if __name__ == "__main__":
  main()
