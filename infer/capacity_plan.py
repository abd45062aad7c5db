"""Per-device memory of a context-parallel decode step, from compiled executables.

Nothing is allocated: the KV cache and the new token's q/k/v are ShapeDtypeStructs
carrying their shardings (duojax.sharding), one attention layer's decode step
(write the token, attend, retrieval heads context-parallel over `sequence`) is
lowered and compiled for fake CPU devices, and XLA's memory analysis gives the
bytes each device holds. One layer is compiled and the model total is that layer
times the layer count (layers run one after another, so temporaries are not
summed); "duo 0.5" gives every layer half retrieval and half streaming heads, the
shape a global 50% pattern has on average.

  python -m infer.capacity_plan        # Llama-3-8B shape, 128K/1M/4M tokens, 4 and 8 devices
  python -m infer.capacity_plan --contexts 32K --meshes sequence=2,tensor=4 --sparsities 0.5

This is a skeleton of the issue-16 capacity plan: attention and KV cache only (no
weights, no MLP, no activations of the rest of the layer). The temp column is the
CPU compiler's: for the XLA reference op it holds a transposed (and, in bf16,
fp32) copy of the device's cache slice, 1.5x the slice, which a kernel reading
the cache as it lies does not need; compile for the target (TPU AOT with libtpu)
for that figure.
"""

from __future__ import annotations

import argparse
import os
import sys

MODELS = {  # (layers, KV heads, query heads per KV head, head dim)
    "llama3-8b": (32, 8, 4, 128),
    "llama3-70b": (80, 8, 8, 128),
}


def _tokens(s: str) -> int:
  s = s.strip().upper()
  mult = {"K": 1 << 10, "M": 1 << 20}.get(s[-1:], 1)
  return int(s[:-1] if s[-1:] in "KM" else s) * mult


def _args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--model", default="llama3-8b", choices=sorted(MODELS))
  ap.add_argument("--contexts", default="128K,1M,4M", help="comma list, K = 1024, M = 1024^2")
  ap.add_argument("--meshes", default="sequence=4;sequence=8;sequence=2,tensor=4",
                  help="';'-separated mesh specs (duojax.sharding.parse_mesh)")
  ap.add_argument("--sparsities", default="0,0.5", help="0 = full attention")
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--sink", type=int, default=64)
  ap.add_argument("--recent", type=int, default=256)
  ap.add_argument("--devices", type=int, default=8, help="fake CPU devices to compile for")
  return ap.parse_args(argv)


def plan_row(model, context, mesh_spec, sparsity, batch, sink, recent, devices, dtype="bfloat16"):
  import jax
  import jax.numpy as jnp
  import numpy as np

  from duojax import cache as kvc
  from duojax import sharding as sh
  from duojax import context_parallel as cp
  from duojax.config import ModelConfig
  from duojax.pattern import HeadMask

  layers, hkv, g, d = MODELS[model]
  dtype = jnp.dtype(dtype)
  sizes = sh.parse_mesh(mesh_spec)
  n = int(np.prod(list(sizes.values())))
  mesh = sh.make_mesh(mesh_spec, jax.devices()[:n])
  cfg = ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1,
                    num_heads=hkv * g, num_kv_heads=hkv, head_dim=d, name=model)
  sh.check_fits(cfg, mesh)  # a mesh that cannot hold the weights is no plan
  n_r = hkv - int(round(sparsity * hkv))
  mask = HeadMask.from_array(np.arange(hkv)[None, :] < n_r, sink, recent)
  cache = jax.eval_shape(lambda: kvc.init_cache(cfg, batch, context, mask, dtype))
  layer = cache.layers[0]
  layer_sh = sh.cache_shardings(layer, mesh)
  q_sh = sh.logical_sharding(cp.Q_AXES, (batch, 1, hkv, g, d), mesh)
  kv_sh = sh.logical_sharding(cp.CHUNK_KV_AXES, (batch, 1, hkv, d), mesh)
  row_sh = sh.logical_sharding(("batch",), (batch,), mesh)
  args = (sh.abstract(layer, layer_sh),
          jax.ShapeDtypeStruct((batch, 1, hkv, g, d), dtype, sharding=q_sh),
          jax.ShapeDtypeStruct((batch, 1, hkv, d), dtype, sharding=kv_sh),
          jax.ShapeDtypeStruct((batch, 1, hkv, d), dtype, sharding=kv_sh),
          jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=row_sh),
          jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=row_sh))
  step = jax.jit(lambda c, *a: cp.attend(c, *a, mesh=mesh), donate_argnums=0,
                 out_shardings=(q_sh, layer_sh))
  mem = step.lower(*args).compile().memory_analysis()
  cache_bytes = sum(int(np.prod(sh_.shard_shape(x.shape))) * x.dtype.itemsize
                    for x, sh_ in zip(jax.tree_util.tree_leaves(layer),
                                      jax.tree_util.tree_leaves(layer_sh)))
  return {
      "model": model, "context": context, "mesh": mesh_spec, "devices": n,
      "attention": "full" if sparsity == 0 else f"duo {sparsity:g}", "retrieval_heads": n_r,
      "cache_per_device_layer": cache_bytes,
      "args_per_device": mem.argument_size_in_bytes, "temp_per_device": mem.temp_size_in_bytes,
      "alias_per_device": mem.alias_size_in_bytes,
  }


def _gib(x: int) -> str:
  return f"{x / (1 << 30):.2f}"


def main(argv=None) -> int:
  a = _args(argv)
  if "jax" not in sys.modules:  # fake devices must be asked for before jax starts
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={a.devices}").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
  from duojax.sharding import ShardingError
  layers = MODELS[a.model][0]
  print(f"| model | context | mesh | attention | KV cache GiB / device ({layers} layers) | "
        "compiled args GiB / device | temp MiB / device (one layer's step) |")
  print("|---|---|---|---|---|---|---|")
  for ctx in a.contexts.split(","):
    for spec in a.meshes.split(";"):
      for sp in a.sparsities.split(","):
        try:
          r = plan_row(a.model, _tokens(ctx), spec, float(sp), a.batch, a.sink, a.recent,
                       a.devices)
        except ShardingError as e:
          print(f"| {a.model} | {ctx} | {spec} | sparsity {sp} | error: {e} | | |")
          continue
        print(f"| {a.model} | {ctx} | {spec} | {r['attention']} | "
              f"{_gib(layers * r['cache_per_device_layer'])} | "
              f"{_gib(layers * r['args_per_device'])} | {r['temp_per_device'] / (1 << 20):.0f} |",
              flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
