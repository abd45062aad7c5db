"""The PyTorch benchmark peer (infer/torch_peer.py) computes what HF transformers computes.

Its decode step is hand-written torch; the oracle is HF's `LlamaForCausalLM` run over the
whole sequence at once. A batch of two rows at different positions checks the per-row
cache write and length mask; GQA and MHA; llama3 RoPE scaling checks that the peer reads
HF's inv_freq rather than recomputing plain RoPE.
"""

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _peer():
  from infer import torch_peer  # the repo root is on pytest's path (pyproject)
  return torch_peer


@pytest.mark.parametrize("kv_heads,rope_scaling", [(2, None), (4, None),
                                                     (2, {"rope_type": "llama3", "factor": 8.0,
                                                          "low_freq_factor": 1.0,
                                                          "high_freq_factor": 4.0,
                                                          "original_max_position_embeddings": 16})])
def test_peer_decode_equals_hf_forward(kv_heads, rope_scaling):
  tp = _peer()
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96,
                                 num_hidden_layers=3, num_attention_heads=4,
                                 num_key_value_heads=kv_heads, max_position_embeddings=256,
                                 rope_theta=500.0, rope_scaling=rope_scaling,
                                 tie_word_embeddings=False)
  hf = transformers.LlamaForCausalLM(cfg).eval().float()
  lengths = [13, 7]  # row 1 stops early: its later steps must not disturb row 0
  seqs = [torch.randint(0, 97, (n,)) for n in lengths]
  with torch.no_grad():
    want = [hf(input_ids=s[None]).logits[0] for s in seqs]  # [T, V] each
  pcfg, weights = tp.StaticLlama.from_hf(hf)
  peer = tp.StaticLlama(pcfg, weights, batch=2, capacity=16, device=torch.device("cpu"),
                        dtype=torch.float32)
  got = [[], []]
  for t in range(max(lengths)):
    # Rows past their length repeat their last token/position (a no-op rewrite of that slot).
    toks = torch.stack([s[min(t, len(s) - 1)] for s in seqs])
    pos = torch.tensor([min(t, n - 1) for n in lengths])
    logits = peer.step(toks, pos)
    for b, n in enumerate(lengths):
      if t < n:
        got[b].append(logits[b])
  for b in range(2):
    g = torch.stack(got[b])
    err = (g - want[b]).abs().max().item()
    assert err < 2e-5 * max(1.0, want[b].abs().max().item()), (b, err)
