"""Gate-training samples: BOS exactly as deployment adds it; every sample within --max-len."""

import jax
import numpy as np
import pytest

from duojax.config import tiny_config
from duojax.data.haystack import HaystackTokens
from duojax.data.passkey import MultiPasskeyConfig, make_sample, special_prefix
from duojax.identify import duo
from helpers import tiny_hf_tokenizer

TEXT = " ".join(f"Sentence number {i} tells of the {i % 7}th thing." for i in range(600))


class CharTok:
  """No special tokens at all (encode ignores add_special_tokens)."""

  def encode(self, text, add_special_tokens=False):
    return [ord(c) for c in text]

  def decode(self, ids):
    return "".join(chr(i) for i in ids)


class BosCharTok(CharTok):
  """Adds BOS (id 1) with special tokens, like Llama / Mistral tokenizers."""

  def encode(self, text, add_special_tokens=False):
    return ([1] if add_special_tokens else []) + super().encode(text)


def hf_bos_tokenizer():
  """The tiny HF tokenizer with a BOS post-processor (as Llama's adds `<s>`)."""
  from tokenizers import processors
  tok = tiny_hf_tokenizer()
  tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
      single="<s> $A", special_tokens=[("<s>", 1)])
  return tok


def _deployed_prefix(tok, text="Hello there"):
  """What serving.encode_prompt puts before the text (`tok(text).input_ids`)."""
  ids = tok(text).input_ids
  plain = tok.encode(text, add_special_tokens=False)
  return ids[:len(ids) - len(plain)]


def test_special_prefix_matches_deployment():
  hf_plain, hf_bos = tiny_hf_tokenizer(), hf_bos_tokenizer()
  assert _deployed_prefix(hf_plain) == [] and special_prefix(hf_plain) == []
  assert _deployed_prefix(hf_bos) == [1] and special_prefix(hf_bos) == [1]
  assert special_prefix(CharTok()) == [] and special_prefix(BosCharTok()) == [1]


@pytest.mark.parametrize("make_tok, bos", [(CharTok, False), (BosCharTok, True),
                                           (tiny_hf_tokenizer, False), (hf_bos_tokenizer, True)])
def test_sample_starts_with_bos_iff_tokenizer_adds_it(make_tok, bos):
  tok = make_tok()
  hay = HaystackTokens(TEXT, tok, line_breaks=False)
  cfg = MultiPasskeyConfig(num_passkeys=2, passkey_words=3, min_len=400, max_len=700,
                           len_intervals=4, seed=1)
  for step in range(3):
    s = make_sample(hay, tok, cfg, step)
    assert s.prefix_len == int(bos)
    if bos:
      assert s.input_ids[0] == 1 and 1 not in s.input_ids[1:].tolist()
    else:
      assert 1 not in s.input_ids.tolist()
    assert not s.loss_mask[:s.context_len].any() and s.loss_mask[s.context_len:].all()
    for i, (a, b) in enumerate(s.needle_spans):  # spans index input_ids, prefix included
      assert s.prefix_len <= a < b <= s.context_len
      if isinstance(tok, CharTok):  # lossless: the span decodes to its needle
        assert s.passkeys[i] in tok.decode(s.input_ids[a:b].tolist())


@pytest.mark.parametrize("make_tok", [CharTok, BosCharTok])
def test_every_sample_within_max_len_many_seeds_and_lengths(make_tok):
  tok = make_tok()
  hay = HaystackTokens(TEXT * 3, tok, line_breaks=False)
  for seed in range(4):
    for lo, hi, n in ((500, 500, 1), (500, 900, 7), (600, 2000, 13), (1999, 2000, 2)):
      cfg = MultiPasskeyConfig(num_passkeys=2, passkey_words=4, min_len=lo, max_len=hi,
                               len_intervals=n, seed=seed)
      grid = cfg.length_grid()
      for step in range(12):
        s = make_sample(hay, tok, cfg, step)
        assert len(s.input_ids) in grid and len(s.input_ids) <= hi
        assert len(s.input_ids) == len(s.loss_mask)
        assert s.loss_mask.sum() == len(s.input_ids) - s.context_len > 0


def test_too_short_for_the_tail_is_a_clear_error():
  tok = CharTok()
  hay = HaystackTokens(TEXT, tok, line_breaks=False)
  cfg = MultiPasskeyConfig(num_passkeys=3, passkey_words=8, min_len=150, max_len=150)
  with pytest.raises(ValueError, match="tail alone takes .* raise min_len"):
    make_sample(hay, tok, cfg, 0)


def test_batches_fit_model_context_and_max_len_is_checked(tmp_path):
  """make_batch rows are within max_len (the padding bucket may exceed it); a max_len
  above the model's context is refused before any step."""
  tok = BosCharTok()
  hay = HaystackTokens(TEXT, tok, line_breaks=False)
  tc = duo.GateTrainConfig(steps=1, batch_size=3, min_len=250, max_len=512, len_intervals=5,
                           num_passkeys=1, passkey_words=2, sink=4, recent=8, pad_multiple=128,
                           dtype="float32")
  dc = MultiPasskeyConfig(num_passkeys=1, passkey_words=2, min_len=250, max_len=512,
                          len_intervals=5, seed=tc.seed)
  for step in range(5):
    tokens, lengths, mask = duo.make_batch(hay, tok, dc, tc, step)
    assert lengths.max() <= 512 and (tokens[:, 0] == 1).all()
    assert not mask[np.arange(tokens.shape[1])[None, :] >= lengths[:, None]].any()
  cfg = tiny_config(num_layers=1, max_position_embeddings=500)
  from duojax.model import init_params
  params = init_params(cfg, jax.random.PRNGKey(0))
  with pytest.raises(duo.TrainError, match="exceeds the model's context 500"):
    duo.train_gates(params, cfg, tok, hay, tc, tmp_path, progress=False)
