"""Generate text with full, DuoAttention or streaming attention.

  python -m duojax.infer --chat --prompt "What is the capital of France?"
  python -m duojax.infer --ckpt DIR --attention duo --pattern DIR --sparsity 0.5 --prompt-file f.txt

With no --ckpt the embedded SmolLM2-135M-Instruct is used (converted on first use).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from duojax import kv_quant, serving, validate
from duojax.checkpoint.hf import CheckpointError
from duojax.config import DEPLOY, ConfigError, DuoSettings
from duojax.engine import InputError, SamplingSettings, generate
from duojax.pattern import PatternError
from duojax.serving import ATTENTION_KINDS


def build_parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(prog="python -m duojax.infer", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--ckpt", default=None,
                  help="checkpoint folder (duojax.convert) or embedded name; default smollm2-135m")
  src = ap.add_mutually_exclusive_group(required=True)
  src.add_argument("--prompt", action="append", help="prompt text; repeat for a batch")
  src.add_argument("--prompt-file", help="a file whose whole text is the prompt")
  ap.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
  ap.add_argument("--max-new-tokens", type=int, default=128)
  ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
  ap.add_argument("--top-p", type=float, default=1.0)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--attention", choices=ATTENTION_KINDS, default=None,
                  help="default: duo when a pattern is available, else full")
  ap.add_argument("--pattern", help="a head-pattern folder (ours or the reference format)")
  sel = ap.add_mutually_exclusive_group()
  sel.add_argument("--sparsity", type=float, help="fraction of KV heads that stream")
  sel.add_argument("--threshold", type=float, help="retrieval iff gate >= threshold")
  ap.add_argument("--sink", type=int, default=None,
                  help=f"sink tokens of streaming heads ({DEPLOY.sink})")
  ap.add_argument("--recent", type=int, default=None,
                  help=f"recent window of streaming heads ({DEPLOY.recent})")
  ap.add_argument("--compensation", action="store_true",
                  help="streaming heads keep one extra key/value: the mean of the tokens that "
                       "left their window (RazorAttention's compensation token; xla backend)")
  ap.add_argument("--prefill-chunk", type=int, default=4096)
  ap.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                  help="compute dtype (default: as stored)")
  ap.add_argument("--weights-dtype", choices=("bf16", "int8"), default="bf16",
                  help="int8: weight-only quantised projections (qwix, a scale per output "
                       "channel); bf16: the weights as stored")
  ap.add_argument("--kv-dtype", choices=kv_quant.KV_DTYPES, default=None,
                  help="KV cache storage: int8/int4 quantise each token's keys and values per "
                       "KV head (a float32 scale and zero point; int4 two values a byte); "
                       "k8v4: int8 keys, int4 values (for models whose keys have outlier "
                       "channels, e.g. Qwen2.5); default: the compute dtype")
  ap.add_argument("--backend", default="auto", help="attention backend: auto, xla, gpu, tpu")
  ap.add_argument("--mesh", default=None,
                  help="device mesh, e.g. data=2,tensor=4 or sequence=8 (axes data, fsdp, "
                       "sequence, tensor; sizes multiply to the device count); default: one "
                       "device")
  ap.add_argument("--json", action="store_true", help="print one JSON object")
  return ap


def check_args(a) -> str:
  """Every flag checked before anything is loaded; returns the resolved backend."""
  from duojax.attention.dispatch import resolve_backend
  validate.sampling(a.temperature, a.top_p)
  validate.selection(a.sparsity, a.threshold)
  validate.window(a.sink, a.recent)
  validate.at_least("--max-new-tokens", a.max_new_tokens, 1)
  validate.at_least("--prefill-chunk", a.prefill_chunk, 1)
  if a.prompt is not None and not any(p.strip() for p in a.prompt):
    raise validate.ArgumentError("--prompt is empty; pass the prompt text")
  if a.compensation and kv_quant.kv_bits_of(a.kv_dtype):
    raise validate.ArgumentError("--compensation is built for unquantised caches; drop it or "
                                 "use --kv-dtype bf16")
  if a.compensation and a.attention == "full":
    raise validate.ArgumentError("--compensation applies to streaming heads; use it with "
                                 "--attention duo, streaming or random")
  if a.attention in ("full", "streaming") and (a.sparsity is not None or a.threshold is not None):
    raise validate.ArgumentError(f"--sparsity/--threshold choose heads for duo or random; "
                                 f"--attention {a.attention} takes neither")
  if a.attention == "random" and a.threshold is not None:
    raise validate.ArgumentError("--attention random picks heads by --sparsity; it has no gates "
                                 "for --threshold")
  if a.mesh:
    import jax
    from duojax import sharding
    n = sharding.parse_mesh(a.mesh, jax.device_count())  # the product must match the devices
    if n["fsdp"] > 1:
      raise validate.ArgumentError("--mesh fsdp=N shards weights for gate training; inference "
                                   "takes data, tensor and sequence")
    if a.compensation and n["sequence"] > 1:
      raise validate.ArgumentError("--compensation is not built for --mesh sequence>1; use "
                                   "sequence=1 (data/tensor) or drop --compensation")
    if jax.device_count() > 1:
      if a.backend in ("auto", "xla"):  # auto stays on the reference until the kernels'
        return "xla"                    # shard_map route has run on real chips
      # a named kernel backend runs per device under shard_map (engine.mesh_backend)
      from duojax.attention.dispatch import BackendUnavailable
      try:
        return resolve_backend(a.backend)
      except BackendUnavailable as e:
        raise validate.ArgumentError(f"--backend {a.backend} cannot run here ({e}); use "
                                     "--backend xla with --mesh, or drop --mesh") from e
  return resolve_backend(a.backend)


def enable_compile_cache() -> None:
  """JAX's persistent compilation cache under DUOJAX_HOME: the prefill/decode programs
  compile once per shape and settings, later runs load them (DUOJAX_COMPILE_CACHE=0: off)."""
  if os.environ.get("DUOJAX_COMPILE_CACHE", "1") == "0":
    return
  import jax
  from duojax.checkpoint.embedded import duojax_home
  try:
    d = duojax_home() / "jax_cache"
    d.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(d))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  except (OSError, AttributeError, ValueError):
    pass  # an unwritable home or an older JAX: compile every time, as before


def run(a) -> dict:
  from duojax.checkpoint import store
  from duojax.checkpoint.embedded import resolve_checkpoint
  from duojax.config import round_up
  backend = check_args(a)
  texts = [validate.readable_text("--prompt-file", a.prompt_file)] if a.prompt_file else a.prompt
  folder = resolve_checkpoint(a.ckpt, progress=not a.json)
  config = store.load_config(folder)
  tok = store.load_tokenizer(folder)
  prompts = [serving.encode_prompt(tok, t, a.chat) for t in texts]  # before loading weights
  longest = max(len(p) for p in prompts)
  if longest + a.max_new_tokens > config.max_position_embeddings:  # before loading the weights
    raise InputError(
        f"prompt of {longest} tokens + {a.max_new_tokens} new tokens exceeds the model's context "
        f"of {config.max_position_embeddings}; shorten the prompt or lower --max-new-tokens")
  # No streaming buffer larger than what this run can hold (full attention's cache).
  capacity = min(round_up(longest + a.max_new_tokens, 16), config.max_position_embeddings)
  sink = DEPLOY.sink if a.sink is None else a.sink
  recent = DEPLOY.recent if a.recent is None else a.recent
  sink_c, recent_c = validate.capped_window(sink, recent, capacity)
  if (sink_c, recent_c) != (sink, recent) and (a.sink is not None or a.recent is not None):
    print(f"duojax.infer: note: --sink {sink} + --recent {recent} exceed the {capacity} tokens "
          f"this run holds (prompt {longest} + {a.max_new_tokens} new, rounded up); using sink "
          f"{sink_c} + recent {recent_c}: the same attention, a smaller cache", file=sys.stderr)
  settings = DuoSettings(sink=sink_c, recent=recent_c, prefill_chunk=a.prefill_chunk)
  sampling = SamplingSettings(a.temperature, a.top_p)
  mesh = None
  if a.mesh:  # before loading: the weights are read straight into their shards on it
    from duojax import sharding
    mesh = sharding.make_mesh(a.mesh)
  m = serving.load_model(str(folder), a.attention, a.pattern, a.sparsity, a.threshold,
                         settings.sink, settings.recent, serving.parse_dtype(a.dtype), a.seed,
                         progress=not a.json, compensation=a.compensation, tokenizer=tok,
                         weights_dtype=a.weights_dtype, mesh=mesh)
  if not a.json:
    print("duojax.infer: compiling prefill and decode (about 30 s on a CPU the first time; "
          "later runs reuse the compiled programs)...", file=sys.stderr, flush=True)
  r = generate(m.model, m.config, prompts, a.max_new_tokens, m.mask, settings.prefill_chunk,
               sampling, a.seed, backend, compensation=m.compensation, mesh=mesh,
               kv_dtype=a.kv_dtype)
  eos = set(m.config.eos_token_ids)
  outs = [m.tokenizer.decode([t for t in row if t not in eos], skip_special_tokens=True)
          for row in r.tokens]
  info = {
      "text": outs[0] if len(outs) == 1 else outs,
      "prompt_tokens": r.prompt_lengths[0] if len(outs) == 1 else r.prompt_lengths,
      "generated_ids": r.tokens[0] if len(outs) == 1 else r.tokens,
      "prefill_seconds": round(r.prefill_seconds, 4),
      "decode_seconds": round(r.decode_seconds, 4),
      "decode_tokens_per_second": round(r.decode_tokens_per_second, 2),
      "compile_seconds": round(r.compile_seconds, 2),
      "kv_cache_bytes": r.kv_cache_bytes,
      "kv_dtype": a.kv_dtype,
      "attention": m.attention,
      "compensation": m.compensation,
      "retrieval_head_fraction": 1.0 if m.mask is None else round(m.mask.retrieval_fraction, 4),
      "sink": None if m.mask is None else m.mask.sink,
      "recent": None if m.mask is None else m.mask.recent,
      "model": m.config.name,
      "weights_dtype": a.weights_dtype,
      "mesh": None if mesh is None else {k: int(v) for k, v in mesh.shape.items()},
  }
  return info


def main(argv=None) -> int:
  a = build_parser().parse_args(argv)
  if argv is None:  # a real command line (tests call main(argv) and keep JAX's settings)
    enable_compile_cache()
    # transformers' advice that PyTorch is missing: duojax needs none.
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
  try:
    info = run(a)
  except (InputError, CheckpointError, ConfigError, PatternError, ValueError) as e:
    print(f"duojax.infer: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("duojax.infer: interrupted", file=sys.stderr)
    return 130
  if a.json:
    print(json.dumps(info))
  else:
    texts = info["text"] if isinstance(info["text"], list) else [info["text"]]
    for t in texts:
      print(t)
    print(f"[{info['attention']}: prompt {info['prompt_tokens']} tokens, prefill "
          f"{info['prefill_seconds']:.2f}s, decode {info['decode_tokens_per_second']:.1f} tok/s, "
          f"KV cache {info['kv_cache_bytes'] / 2**20:.1f} MiB]", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
