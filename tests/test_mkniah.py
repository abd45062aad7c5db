"""Multi-key NIAH: seeded prompts, the asked needle at its depth, distinct
distractors, exact token lengths, exact-match scoring, and the CLI on a tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from duojax.data.haystack import HaystackTokens
from duojax.data.mkniah import (NEEDLE, QUESTION, build_multikey_prompt, draw_needles,
                                exact_value_match, first_number)
from duojax.eval import grid, mkniah
from duojax.eval import methods as M
from duojax.eval.generation import GenSettings
from test_eval import CFG, _hay_text, char_tokenizer


@pytest.fixture(scope="module")
def tok():
  return char_tokenizer()


@pytest.fixture(scope="module")
def hay(tok):
  return HaystackTokens(_hay_text(), tok, line_breaks=False)


def test_prompts_are_seeded_and_sized(hay, tok):
  a = build_multikey_prompt(hay, tok, 700, 0.4, seed=5, num_keys=4)
  b = build_multikey_prompt(hay, tok, 700, 0.4, seed=5, num_keys=4)
  c = build_multikey_prompt(hay, tok, 700, 0.4, seed=6, num_keys=4)
  assert np.array_equal(a.ids, b.ids) and a.values == b.values and a.keys == b.keys
  assert a.values != c.values
  for n in (1, 2, 5):
    for length in (400, 651):
      p = build_multikey_prompt(hay, tok, length, 0.5, seed=n, num_keys=n)
      assert p.ids.shape == (length,) and p.ids.dtype == np.int32
      assert len(p.keys) == len(p.values) == len(p.spans) == n


@pytest.mark.parametrize("depth", [0.0, 0.3, 0.75, 1.0])
def test_asked_needle_at_its_depth_among_distinct_needles(hay, tok, depth):
  length, n = 800, 4
  p = build_multikey_prompt(hay, tok, length, depth, seed=int(depth * 100), num_keys=n)
  text = tok.decode(p.ids.tolist())
  assert len(set(p.keys)) == n and len(set(p.values)) == n
  assert all(len(v) == 7 and v.isdigit() and v[0] != "0" for v in p.values)
  for k, v, (a, b) in zip(p.keys, p.values, p.spans):
    assert NEEDLE.format(key=k, value=v) in tok.decode(p.ids[a:b].tolist())
    assert text.count(v) == 1  # each value once: the question names only the key
  assert text.rstrip().endswith(QUESTION.format(key=p.keys[p.asked]))
  assert p.depths[p.asked] == depth and p.answer == p.values[p.asked]
  # Depth is a fraction of the haystack tokens (needles and question excluded); the
  # needle snaps to the nearest sentence start, so within one sentence (~35 chars).
  q_len = len(tok.encode("\n\n" + QUESTION.format(key=p.keys[p.asked]), add_special_tokens=False))
  needle_tokens = sum(b - a for a, b in p.spans)
  hay_len = length - q_len - needle_tokens
  a = p.spans[p.asked][0]
  before = sum(e - s for s, e in p.spans[:p.asked])
  assert abs((a - before) - depth * hay_len) <= 40, (a, before, depth * hay_len)
  # the spans are disjoint and ordered as placed
  assert all(p.spans[i][1] <= p.spans[i + 1][0] for i in range(n - 1))


def test_draw_and_bad_input(hay, tok):
  keys, values = draw_needles(3, 10)
  assert len(set(keys)) == 10 and len(set(values)) == 10
  with pytest.raises(ValueError, match="--keys"):
    draw_needles(0, 0)
  with pytest.raises(ValueError, match="depth"):
    build_multikey_prompt(hay, tok, 500, 1.5, seed=0)
  with pytest.raises(ValueError, match="too small"):
    build_multikey_prompt(hay, tok, 30, 0.5, seed=0)


def test_exact_match_scorer():
  assert exact_value_match("1234567", "1234567")
  assert exact_value_match("The special magic number is 1234567.", "1234567")
  assert exact_value_match("It is 1,234,567", "1234567")
  assert not exact_value_match("12345678", "1234567")  # the digits inside a longer number
  assert not exact_value_match("7654321, not 1234567", "1234567")  # a distractor first
  assert not exact_value_match("no idea", "1234567")
  assert first_number("a 12 b 34") == "12" and first_number("none") is None
  with pytest.raises(ValueError, match="digit"):
    exact_value_match("x", "abc")
  assert grid.score("is 1234567", "1234567") == {"contains": True, "rouge1_recall": 1.0,
                                                  "exact": True}


def test_cells_and_grid_counts_exactly(hay, tok, monkeypatch):
  """A stand-in model answering the value of the needle that lies nearest the
  prompt's end: right iff the asked needle is the last one. The grid's `exact`
  score must count exactly those cells."""
  fmt = grid.prompt_format(tok, True)
  depths = [0.0, 0.5, 1.0]
  cells = mkniah.build_cells(hay, tok, [400, 600], depths, fmt, samples=2, seed=4, num_keys=3)
  assert len(cells) == 2 * 2 * 3
  again = mkniah.build_cells(hay, tok, [400, 600], depths, fmt, samples=2, seed=4, num_keys=3)
  assert [c.prompt for c in again] == [c.prompt for c in cells]
  for c in cells:
    assert len(c.prompt) == c.length
    a, b = c.info["needle_span"]
    assert c.answer in tok.decode(c.prompt[a:b]) and c.answer in c.info["values"]

  def last_needle(params, config, prompts, mask, gen, dtype=None):
    by_prompt = {tuple(c.prompt): c for c in cells}
    outs = []
    for p in prompts:
      c = by_prompt[tuple(p)]
      outs.append(tok.encode(f"It is {c.info['values'][-1]}.", add_special_tokens=False))
    return outs

  monkeypatch.setattr(grid, "greedy_generate", last_needle)
  built = M.build_methods(M.parse_methods("full"), CFG, None, 4, 16)
  gen = GenSettings.for_lengths(600, CFG, max_new_tokens=4, batch_size=6)
  rows, _ = grid.run_grid(None, CFG, tok, cells, built, gen, progress=False)
  want = [c.info["asked"] == len(c.info["values"]) - 1 for c in cells]
  got = {(r["length"], r["depth"], r["sample"]): r["scores"]["exact"] for r in rows}
  assert [got[(c.length, round(c.depth, 4), c.sample)] for c in cells] == want
  assert 0 < sum(want) < len(want)
  s = grid.summarize(rows, "exact")["full"]
  assert s["mean"] == pytest.approx(sum(want) / len(want))
  assert s["grid"][-1] == [1.0, 1.0]  # asked at depth 1: always the last needle


def test_cli_runs_on_the_tiny_model(tmp_path, tok, capsys):
  from duojax.checkpoint import store
  from duojax.eval.__main__ import main
  from duojax.model import init_params
  import jax
  params = init_params(CFG, jax.random.PRNGKey(0), scale=0.2)
  store.save_checkpoint(tmp_path / "ck", CFG, params, tok)
  (tmp_path / "hay.txt").write_text(_hay_text())
  out, png = tmp_path / "mk.json", tmp_path / "mk.png"
  rc = main(["mkniah", "--ckpt", str(tmp_path / "ck"), "--haystack", str(tmp_path / "hay.txt"),
             "--attention", "full,streaming", "--sink", "4", "--recent", "16", "--keys", "3",
             "--lengths", "300,400", "--depths", "2", "--max-new-tokens", "3",
             "--prefill-chunk", "64", "--out", str(out), "--plot", str(png), "--no-progress"])
  assert rc == 0, capsys.readouterr().err
  doc = json.loads(out.read_text())
  assert doc["task"] == "mkniah" and doc["plot_metric"] == "exact"
  assert doc["settings"]["num_keys"] == 3
  assert len(doc["cells"]) == 2 * 2 * 2
  assert set(doc["summary"]["exact"]) == {"full", "streaming"}
  assert all(len(c["values"]) == 3 and c["answer"] in c["values"] for c in doc["cells"])
  assert png.stat().st_size > 2000
  rc = main(["mkniah", "--ckpt", str(tmp_path / "ck"), "--haystack", str(tmp_path / "hay.txt"),
             "--keys", "0", "--out", str(out), "--no-progress"])
  assert rc == 2 and "--keys must be >= 1" in capsys.readouterr().err
