"""Generate text with full, DuoAttention or streaming attention.

  python -m duojax.infer --chat --prompt "What is the capital of France?"
  python -m duojax.infer --ckpt DIR --attention duo --pattern DIR --sparsity 0.5 --prompt-file f.txt

With no --ckpt the embedded SmolLM2-135M-Instruct is used (converted on first use).
"""

from __future__ import annotations

import argparse
import json
import sys

from duojax.checkpoint.hf import CheckpointError
from duojax.config import ConfigError, DuoSettings
from duojax.engine import InputError, SamplingSettings, generate
from duojax.pattern import PatternError
from duojax.serving import ATTENTION_KINDS, load_model, parse_dtype


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
  ap.add_argument("--sink", type=int, default=None, help="sink tokens of streaming heads (64)")
  ap.add_argument("--recent", type=int, default=None, help="recent window of streaming heads (256)")
  ap.add_argument("--compensation", action="store_true",
                  help="streaming heads keep one extra key/value: the mean of the tokens that "
                       "left their window (RazorAttention's compensation token; xla backend)")
  ap.add_argument("--prefill-chunk", type=int, default=4096)
  ap.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                  help="compute dtype (default: as stored)")
  ap.add_argument("--backend", default="auto", help="attention backend: auto, xla, gpu, tpu")
  ap.add_argument("--json", action="store_true", help="print one JSON object")
  return ap


def run(a) -> dict:
  from duojax.attention.dispatch import resolve_backend
  settings = DuoSettings(sink=64 if a.sink is None else a.sink,
                         recent=256 if a.recent is None else a.recent,
                         prefill_chunk=a.prefill_chunk)
  sampling = SamplingSettings(a.temperature, a.top_p)
  m = load_model(a.ckpt, a.attention, a.pattern, a.sparsity, a.threshold, settings.sink,
                 settings.recent, parse_dtype(a.dtype), a.seed, progress=not a.json,
                 compensation=a.compensation)
  if a.prompt_file:
    try:
      texts = [open(a.prompt_file, encoding="utf-8").read()]
    except OSError as e:
      raise InputError(f"cannot read --prompt-file: {e}") from e
  else:
    texts = a.prompt
  prompts = [m.encode_prompt(t, a.chat) for t in texts]
  r = generate(m.params, m.config, prompts, a.max_new_tokens, m.mask, settings.prefill_chunk,
               sampling, a.seed, resolve_backend(a.backend), compensation=m.compensation)
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
      "attention": m.attention,
      "compensation": m.compensation,
      "retrieval_head_fraction": 1.0 if m.mask is None else round(m.mask.retrieval_fraction, 4),
      "sink": None if m.mask is None else m.mask.sink,
      "recent": None if m.mask is None else m.mask.recent,
      "model": m.config.name,
  }
  return info


def main(argv=None) -> int:
  a = build_parser().parse_args(argv)
  try:
    info = run(a)
  except (InputError, CheckpointError, ConfigError, PatternError, ValueError) as e:
    print(f"duojax.infer: error: {e}", file=sys.stderr)
    return 2
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
