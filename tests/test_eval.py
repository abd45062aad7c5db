"""duojax.eval on a tiny random model with a character tokenizer (fast, CPU)."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from duojax.config import tiny_config
from duojax.data.haystack import HaystackTokens
from duojax.data.niah import NeedleTask
from duojax.eval import grid, methods as M, niah, passkey, plots, ppl
from duojax.eval.generation import GenSettings, greedy_generate
from duojax.model import init_params, llama
from duojax.pattern import HeadMask, random_pattern

CFG = tiny_config(vocab_size=128, max_position_embeddings=1024)
WORDS = ("river", "stone", "maple", "quiet", "lamp", "orbit", "cedar", "violet", "harbor", "wind")


def _hay_text(n_sentences: int = 120) -> str:
  rng = np.random.default_rng(3)
  out = []
  for i in range(n_sentences):
    w = " ".join(WORDS[j] for j in rng.integers(len(WORDS), size=3))
    out.append(f"Line {i} has {w}.")
    if i % 9 == 8:
      out.append("\n\n")
  return " ".join(out)


def char_tokenizer():
  """One token per character (ids = ASCII codes), with a tiny chat template."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast
  vocab = {chr(i): i for i in range(32, 127)}
  vocab.update({"\n": 10, "<unk>": 0, "<s>": 1, "</s>": 2})
  t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  t.pre_tokenizer = pre_tokenizers.Split("", "isolated")
  t.decoder = decoders.Fuse()
  tok = PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", bos_token="<s>",
                                eos_token="</s>")
  tok.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n"
                       "{% endfor %}{% if add_generation_prompt %}<s>assistant\n{% endif %}")
  return tok


@pytest.fixture(scope="module")
def tok():
  return char_tokenizer()


@pytest.fixture(scope="module")
def hay(tok):
  return HaystackTokens(_hay_text(), tok, line_breaks=False)


@pytest.fixture(scope="module")
def params():
  return init_params(CFG, jax.random.PRNGKey(0), scale=0.2)


TASK = NeedleTask(needle="The secret fruit is a green mango.", question="What is the secret fruit?",
                  answer="a green mango")


# -- axes, methods and bad input ----------------------------------------------------

def test_parse_axes():
  assert grid.parse_lengths("2000,1000,4k,1000") == [1000, 2000, 4000]
  assert grid.parse_depths("3") == [0.0, 0.5, 1.0]
  assert grid.parse_depths("1") == [0.5]
  assert grid.parse_depths("0.9,0.1") == [0.1, 0.9]
  with pytest.raises(ValueError, match="n >= 1"):
    grid.parse_depths("0")
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    grid.parse_depths("0.5,1.5")
  with pytest.raises(ValueError, match="--lengths"):
    grid.parse_lengths("abc")


def test_parse_methods():
  ms = M.parse_methods("full,duo,streaming,random", "0.25,0.5")
  assert [m.name for m in ms] == ["full", "duo@0.25", "duo@0.5", "streaming", "random@0.25",
                                  "random@0.5"]
  assert [m.name for m in M.parse_methods("duo@0.75,full,duo@0.75")] == ["duo@0.75", "full"]
  assert M.parse_methods("duo")[0].sparsity is None
  with pytest.raises(ValueError, match="kinds are"):
    M.parse_methods("fast")
  with pytest.raises(ValueError, match="only duo and random"):
    M.parse_methods("full@0.5")
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    M.parse_methods("duo", "1.5")


def test_baseline_masks():
  pat = random_pattern(CFG.num_layers, CFG.num_kv_heads, seed=5)
  built = M.build_methods(M.parse_methods("full,duo,streaming,random", "0.5"), CFG, pat,
                          sink=4, recent=8, seed=1)
  full, duo, stream, rnd = built
  assert full.mask is None and full.retrieval_fraction == 1.0
  assert duo.mask == pat.with_settings(sink=4, recent=8).binarize(sparsity=0.5)
  assert stream.mask.retrieval_fraction == 0.0 and (stream.mask.sink, stream.mask.recent) == (4, 8)
  n = CFG.num_layers * CFG.num_kv_heads
  assert rnd.mask.retrieval_fraction == pytest.approx(1 - round(0.5 * n) / n)
  again = M.build_methods([M.Method("random", 0.5)], CFG, None, 4, 8, seed=1)[0]
  assert again.mask == rnd.mask  # seeded
  with pytest.raises(ValueError, match="needs a head pattern"):
    M.build_methods([M.Method("duo", 0.5)], CFG, None)


def test_methods_with_pattern_sources_and_compensation(tmp_path):
  ms = M.parse_methods("full,duo,razor,rscore,random,duo+comp,streaming+comp", "0.5",
                       sources=("razor", "rscore"))
  assert [m.name for m in ms] == ["full", "duo@0.5", "razor@0.5", "rscore@0.5", "random@0.5",
                                  "duo@0.5+comp", "streaming+comp"]
  assert ms[2] == M.Method("duo", 0.5, "razor") and ms[5].compensation and ms[5].source is None
  assert M.parse_methods("retrieval-score@0.25", sources=["rscore"])[0].name == "rscore@0.25"
  assert M.parse_methods("razor@0.75+comp", sources=["razor"])[0] == M.Method(
      "duo", 0.75, "razor", True)
  folder = tmp_path / "pat"
  folder.mkdir()
  assert M.parse_methods(f"{folder}@0.5")[0] == M.Method("duo", 0.5, str(folder))
  with pytest.raises(ValueError, match="--patterns razor=DIR .*identify razor"):
    M.parse_methods("razor")
  with pytest.raises(ValueError, match="kinds are"):
    M.parse_methods("razr", sources=["razor"])
  with pytest.raises(ValueError, match="full attention streams no head"):
    M.parse_methods("full+comp")
  with pytest.raises(ValueError, match="only suffix"):
    M.parse_methods("duo+fast")
  assert M.parse_named_patterns("razor=a, retrieval-score=b") == {"razor": "a", "rscore": "b"}
  for bad in ("razor", "duo=x", "a@b=x", "=x"):
    with pytest.raises(ValueError, match="--patterns"):
      M.parse_named_patterns(bad)


def test_build_named_patterns(tmp_path):
  duo = random_pattern(CFG.num_layers, CFG.num_kv_heads, seed=5)
  razor = random_pattern(CFG.num_layers, CFG.num_kv_heads, seed=6)
  razor.save(tmp_path / "razor")
  ms = [M.Method("duo", 0.5), M.Method("duo", 0.5, "razor"), M.Method("duo", 0.5, "razor", True),
        M.Method("duo", 0.5, str(tmp_path / "razor")), M.Method("streaming", compensation=True)]
  built = M.build_methods(ms, CFG, duo, sink=4, recent=8, patterns={"razor": razor})
  want = razor.with_settings(sink=4, recent=8).binarize(sparsity=0.5)
  assert built[0].mask == duo.with_settings(sink=4, recent=8).binarize(sparsity=0.5)
  assert built[1].mask == built[2].mask == built[3].mask == want != built[0].mask
  assert built[2].describe()["compensation"] is True and built[2].describe()["source"] == "razor"
  assert built[4].mask.retrieval_fraction == 0.0
  # the named patterns alone suffice when plain duo is not asked for
  assert M.build_methods(ms[1:2], CFG, None, patterns={"razor": razor})[0].mask is not None
  with pytest.raises(ValueError, match="--patterns rscore=DIR"):
    M.build_methods([M.Method("duo", 0.5, "rscore")], CFG, duo)
  with pytest.raises(ValueError, match="compensation token needs streaming heads"):
    M.build_methods([M.Method("full", compensation=True)], CFG, None)


def test_bad_input(hay, tok):
  with pytest.raises(ValueError, match="answer is empty"):
    NeedleTask(answer="  ")
  with pytest.raises(ValueError, match="haystack has .* tokens but the longest prompt needs"):
    niah.build_cells(hay, tok, TASK, [len(hay) + 10], [0.5], grid.PromptFormat())
  with pytest.raises(ValueError, match="exceed the model's context"):
    GenSettings.for_lengths(CFG.max_position_embeddings, CFG, max_new_tokens=8)
  with pytest.raises(ValueError, match="samples"):
    niah.build_cells(hay, tok, TASK, [300], [0.5], grid.PromptFormat(), samples=0)


# -- prompts: exact lengths, insertion depth, chat wrapping -------------------------

@pytest.mark.parametrize("chat", [False, True])
def test_niah_cells(hay, tok, chat):
  fmt = grid.prompt_format(tok, chat)
  depths = grid.parse_depths("5")
  cells = niah.build_cells(hay, tok, TASK, [300, 600], depths, fmt, samples=2, seed=1)
  assert len(cells) == 2 * 2 * 5
  for c in cells:
    assert len(c.prompt) == c.length
    a, b = c.info["needle_span"]
    assert TASK.needle in tok.decode(c.prompt[a:b])
    # The needle sits at the sentence start nearest depth * (haystack tokens),
    # so its offset inside the body is within about one sentence of that.
    template = niah.CHAT_QUESTION if chat else niah.PLAIN_QUESTION
    question = len(tok.encode(template.format(question=TASK.question), add_special_tokens=False))
    hay_len = c.length - fmt.overhead() - question - (b - a)
    assert abs((a - len(fmt.head)) - c.depth * hay_len) <= 40
    text = tok.decode(c.prompt)
    assert TASK.question in text
    assert text.startswith("<s>user\n") == chat and text.endswith("<s>assistant\n") == chat
  # Samples differ in haystack window, not in depth or length.
  first = {(c.length, c.depth): c.prompt for c in cells if c.sample == 0}
  second = {(c.length, c.depth): c.prompt for c in cells if c.sample == 1}
  assert first.keys() == second.keys() and all(first[k] != second[k] for k in first)


def test_passkey_cells(hay, tok):
  fmt = grid.PromptFormat()
  cells = passkey.build_cells(hay, tok, [300, 500], [0.0, 0.5, 1.0], fmt, seed=3)
  keys = [c.answer for c in cells]
  assert all(len(k) == 5 and k.isdigit() for k in keys)
  assert len(set(keys)) == len(keys)  # a fresh key per cell
  again = passkey.build_cells(hay, tok, [300, 500], [0.0, 0.5, 1.0], fmt, seed=3)
  assert [c.prompt for c in again] == [c.prompt for c in cells]  # seeded
  for c in cells:
    assert len(c.prompt) == c.length and f"pass key is {c.answer}" in tok.decode(c.prompt)
  multi = passkey.build_cells(hay, tok, [500], [0.1, 0.9], fmt, "multi", num_keys=3, key_words=2)
  for c in multi:
    a, b = c.info["needle_span"]
    assert len(c.prompt) == 500 and c.answer in tok.decode(c.prompt[a:b])
    assert passkey.ordinal(c.info["asked"]) in tok.decode(c.prompt[-120:])
  assert multi[0].info["needle_span"][0] < multi[1].info["needle_span"][0]
  with pytest.raises(ValueError, match="--variant"):
    passkey.build_cells(hay, tok, [300], [0.5], fmt, "words")


# -- the grid with a known answer -----------------------------------------------------

def test_grid_scoring_with_an_oracle(hay, tok, params, monkeypatch):
  """A stand-in model that answers iff the needle lies in the tokens its heads can
  see: everything with full attention, sink + recent with streaming. The grid must
  then score exactly the cells whose needle span falls in that window."""
  sink, recent = 40, 150

  def oracle(params, config, prompts, mask, gen, dtype=None):
    outs = []
    for p in prompts:
      seen = p if mask is None else p[:mask.sink] + [0] + p[-mask.recent:]
      found = TASK.answer in tok.decode(seen)
      outs.append(tok.encode(("It is " + TASK.answer) if found else "no idea",
                             add_special_tokens=False))
    return outs

  monkeypatch.setattr(grid, "greedy_generate", oracle)
  cells = niah.build_cells(hay, tok, TASK, [300, 600], grid.parse_depths("5"), grid.PromptFormat())
  built = M.build_methods(M.parse_methods("full,streaming"), CFG, None, sink, recent)
  gen = GenSettings.for_lengths(600, CFG, max_new_tokens=4, batch_size=5)
  rows, _ = grid.run_grid(params, CFG, tok, cells, built, gen, progress=False)
  assert len(rows) == 2 * len(cells)
  for r in rows:
    a, b = r["needle_span"]
    visible = r["method"] == "full" or b <= sink or a >= r["length"] - recent
    assert r["scores"]["contains"] == visible
    assert r["scores"]["rouge1_recall"] == (1.0 if visible else 0.0)
  summ = grid.summarize(rows, "contains")
  assert summ["full"]["mean"] == 1.0
  s = summ["streaming"]
  assert s["lengths"] == [300, 600] and s["depths"] == [0.0, 0.25, 0.5, 0.75, 1.0]
  # [depth][length]: the ends are visible, the middle is not.
  assert s["grid"][0] == [1.0, 1.0] and s["grid"][-1] == [1.0, 1.0] and s["grid"][2] == [0.0, 0.0]


def test_score():
  assert grid.score("The fruit is a Green  mango!", "a green mango") == {
      "contains": True, "rouge1_recall": 1.0}
  assert grid.score("green", "a green mango")["rouge1_recall"] == pytest.approx(1 / 3, abs=1e-4)
  with pytest.raises(ValueError, match="empty"):
    grid.score("x", "")


# -- generation and perplexity agree with the engine -------------------------------------

def _duo_mask():
  return random_pattern(CFG.num_layers, CFG.num_kv_heads, seed=2, sink=4, recent=8).binarize(
      sparsity=0.5)


@pytest.mark.parametrize("kind", ["full", "duo"])
def test_generation_matches_engine(params, kind):
  from duojax.engine import generate
  mask = None if kind == "full" else _duo_mask()
  p = params if mask is None else llama.apply_head_mask(params, mask)
  rng = np.random.default_rng(0)
  prompts = [rng.integers(3, 127, size=n).tolist() for n in (70, 45, 90)]
  gen = GenSettings.for_lengths(90, CFG, max_new_tokens=6, prefill_chunk=32, batch_size=4)
  ours = greedy_generate(p, CFG, prompts, mask, gen)
  ref = generate(p, CFG, prompts, 6, mask, prefill_chunk=32).tokens
  assert ours == [[t for t in r if t not in CFG.eos_token_ids] for r in ref]


def test_generation_with_compensation_matches_engine(params):
  """+comp methods run the compensation cache, exactly as engine.generate does."""
  from duojax.engine import generate
  mask = _duo_mask()
  p = llama.apply_head_mask(params, mask)
  rng = np.random.default_rng(1)
  prompts = [rng.integers(3, 127, size=n).tolist() for n in (70, 45)]
  gen = GenSettings.for_lengths(70, CFG, max_new_tokens=6, prefill_chunk=32, batch_size=2,
                                compensation=True)
  ours = greedy_generate(p, CFG, prompts, mask, gen)
  ref = generate(p, CFG, prompts, 6, mask, prefill_chunk=32, compensation=True).tokens
  assert ours == [[t for t in r if t not in CFG.eos_token_ids] for r in ref]
  # and perplexity's prefill path agrees with the engine's logits
  from duojax.engine import forward_logits
  win = np.asarray([prompts[0][:64]], np.int32)
  nll = ppl.token_nll(p, CFG, win, mask, chunk=16, compensation=True)
  lg = forward_logits(p, CFG, [prompts[0][:64]], mask, chunk=32, compensation=True)[0]
  ref = -jax.nn.log_softmax(lg[:-1])[np.arange(63), win[0, 1:]]
  np.testing.assert_allclose(nll[0], ref, rtol=1e-4, atol=1e-4)
  plain = ppl.token_nll(p, CFG, win, mask, chunk=16)
  assert not np.allclose(nll, plain)  # 64 tokens > sink 4 + recent 8: tokens were dropped


def test_ppl_matches_logits_and_chunking(params, hay):
  from duojax.engine import forward_logits
  windows = np.stack([hay.take(96, 0), hay.take(96, 200)])
  nll = ppl.token_nll(params, CFG, windows, None, chunk=32)
  logits = forward_logits(params, CFG, [w.tolist() for w in windows])
  ref = [-jax.nn.log_softmax(lg[:-1])[np.arange(95), w[1:]] for lg, w in zip(logits, windows)]
  np.testing.assert_allclose(nll, np.stack(ref), rtol=1e-4, atol=1e-4)
  # Streaming heads are exact, so the chunk size must not matter.
  mask = _duo_mask()
  p = llama.apply_head_mask(params, mask)
  np.testing.assert_allclose(ppl.token_nll(p, CFG, windows, mask, chunk=16),
                             ppl.token_nll(p, CFG, windows, mask, chunk=48), rtol=1e-4, atol=1e-4)
  # A window that fits sink + recent streams nothing away: same as full attention.
  wide = HeadMask.all_streaming(CFG.num_layers, CFG.num_kv_heads, 8, 96)
  np.testing.assert_allclose(ppl.token_nll(params, CFG, windows, wide, chunk=32), nll,
                             rtol=1e-4, atol=1e-4)
  assert ppl.bands(100, [10, 50, 200]) == [(0, 10), (10, 50), (50, 99)]


def test_plots(tmp_path):
  rows = [{"method": m, "length": l, "depth": d, "scores": {"contains": float(d < 0.5)}}
          for m in ("full", "duo@0.5") for l in (1000, 2000) for d in (0.0, 0.5, 1.0)]
  png = plots.heatmaps(grid.summarize(rows, "contains"), tmp_path / "h.png", "t")
  assert png.stat().st_size > 2000
  doc = {"length": 100, "results": {"full": {"bands": [{"from": 0, "to": 50, "ppl": 3.0},
                                                       {"from": 50, "to": 99, "ppl": 2.5}]}}}
  assert plots.ppl_bands(doc, tmp_path / "p.png").stat().st_size > 2000


# -- the CLI end to end on a tiny saved checkpoint -----------------------------------------

@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, params, tok):
  from duojax.checkpoint import store
  d = tmp_path_factory.mktemp("eval")
  store.save_checkpoint(d / "ck", CFG, params, tok)
  (d / "hay.txt").write_text(_hay_text())
  random_pattern(CFG.num_layers, CFG.num_kv_heads, seed=9, sink=4, recent=16).save(d / "pat")
  return d


def _cli(*args) -> int:
  from duojax.eval.__main__ import main
  return main([*args, "--no-progress"])


def test_cli_end_to_end(ckpt, capsys):
  d = ckpt
  base = ["--ckpt", str(d / "ck"), "--haystack", str(d / "hay.txt"), "--sink", "4",
          "--recent", "16", "--prefill-chunk", "64"]
  rc = _cli("niah", *base, "--attention", "full,duo,streaming,random", "--pattern",
            str(d / "pat"), "--sparsity", "0.5", "--lengths", "300,400", "--depths", "3",
            "--max-new-tokens", "4", "--out", str(d / "n.json"), "--plot", str(d / "n.png"))
  assert rc == 0, capsys.readouterr().err
  doc = json.loads((d / "n.json").read_text())
  assert [m["name"] for m in doc["methods"]] == ["full", "duo@0.5", "streaming", "random@0.5"]
  assert len(doc["cells"]) == 4 * 2 * 3
  c = doc["cells"][0]
  assert {"method", "length", "depth", "output", "scores", "answer"} <= c.keys()
  assert doc["settings"]["chat"] is True and doc["settings"]["lengths"] == [300, 400]
  assert (d / "n.png").stat().st_size > 2000
  rc = _cli("passkey", *base, "--attention", "full,streaming", "--lengths", "250", "--depths",
            "0,1", "--no-chat", "--max-new-tokens", "3", "--out", str(d / "p.json"))
  assert rc == 0
  assert len(json.loads((d / "p.json").read_text())["cells"]) == 4
  rc = _cli("ppl", *base, "--attention", "full,duo@0.5", "--pattern", str(d / "pat"),
            "--lengths", "64,128", "--samples", "2", "--out", str(d / "q.json"),
            "--plot", str(d / "q.png"))
  assert rc == 0
  q = json.loads((d / "q.json").read_text())
  assert set(q["results"]) == {"full", "duo@0.5"} and len(q["results"]["full"]["bands"]) == 2
  assert "ppl" in capsys.readouterr().out


def test_cli_named_patterns_and_compensation(ckpt, capsys):
  d = ckpt
  rc = _cli("passkey", "--ckpt", str(d / "ck"), "--haystack", str(d / "hay.txt"), "--sink", "4",
            "--recent", "16", "--prefill-chunk", "64", "--attention", "duo,razor,duo+comp",
            "--pattern", str(d / "pat"), "--patterns", f"razor={d / 'pat'}", "--sparsity",
            "0.5", "--lengths", "250", "--depths", "1", "--no-chat", "--max-new-tokens", "3",
            "--out", str(d / "c.json"))
  assert rc == 0, capsys.readouterr().err
  doc = json.loads((d / "c.json").read_text())
  assert [m["name"] for m in doc["methods"]] == ["duo@0.5", "razor@0.5", "duo@0.5+comp"]
  assert doc["settings"]["patterns"] == {"razor": str(d / "pat")}
  assert [m["compensation"] for m in doc["methods"]] == [False, False, True]
  rc = _cli("passkey", "--ckpt", str(d / "ck"), "--haystack", str(d / "hay.txt"),
            "--attention", "razor", "--out", str(d / "e.json"))
  assert rc == 2 and "--patterns razor=DIR" in capsys.readouterr().err


@pytest.mark.parametrize("args, msg", [
    (["--depths", "0"], "n >= 1"),
    (["--answer", ""], "answer is empty"),
    (["--lengths", "100000"], "haystack has"),
    (["--attention", "duo"], "needs a head pattern"),
])
def test_cli_errors(ckpt, capsys, args, msg):
  d = ckpt
  rc = _cli("niah", "--ckpt", str(d / "ck"), "--haystack", str(d / "hay.txt"),
            "--out", str(d / "e.json"), *args)
  assert rc == 2
  assert msg in capsys.readouterr().err


def test_influence_dispatch(capsys):
  from duojax.eval.__main__ import main
  with pytest.raises(SystemExit) as e:
    main(["influence", "--help"])
  assert e.value.code == 0
  assert "python -m duojax.eval influence" in capsys.readouterr().out


# -- compiles: one prefill and one decode program per method, whatever the lengths -------

class _CompileLog:
  """Counts XLA compiles by function name from jax's compile log."""

  def __init__(self):
    import collections
    import logging
    self.names = collections.Counter()
    outer = self

    class H(logging.Handler):
      def emit(self, r):
        m = r.getMessage()
        if m.startswith("Finished XLA compilation of "):
          outer.names[m.split(" of ", 1)[1].split(" in ")[0]] += 1
    self.handler, self.logger = H(), logging.getLogger("jax")

  def __enter__(self):
    from jax.experimental.compilation_cache import compilation_cache
    self.old = (jax.config.jax_log_compiles, self.logger.level,
                jax.config.jax_enable_compilation_cache)
    jax.config.update("jax_log_compiles", True)
    # A program an earlier test of this session built (same function, same shapes) comes
    # from jax's in-memory caches, or from the persistent cache an in-process CLI test turns
    # on (duojax.infer.enable_compile_cache): either way it is not compiled and logs nothing.
    # Count from empty caches, with the persistent one off (reset: jax decides once).
    jax.clear_caches()
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()
    self.logger.addHandler(self.handler)
    self.logger.setLevel(10)
    return self.names

  def __exit__(self, *exc):
    from jax.experimental.compilation_cache import compilation_cache
    jax.config.update("jax_log_compiles", self.old[0])
    jax.config.update("jax_enable_compilation_cache", self.old[2])
    compilation_cache.reset_cache()
    self.logger.setLevel(self.old[1])
    self.logger.removeHandler(self.handler)


def test_grid_compiles_once_per_method(hay, tok, params):
  """A 2-length x 2-method grid compiles 2 programs per method (prefill chunk and
  decode loop), none per length; a second task of the same shapes compiles none;
  the ahead-of-time programs answer as the jitted engine path does."""
  from duojax.eval import harness
  pat = random_pattern(CFG.num_layers, CFG.num_kv_heads, seed=9, sink=4, recent=16)
  built = M.build_methods(M.parse_methods("full,duo", "0.5"), CFG, pat, 4, 16)
  model = harness.EvalModel(CFG, params, tok, None, "tiny", pat, "test", "float32")
  kw = dict(max_new_tokens=3, prefill_chunk=64, batch_size=2, backend="xla")
  programs = {}
  with _CompileLog() as names:
    doc = harness.run_retrieval("niah", model, hay, built, [300, 400], [0.0, 1.0], False, kw,
                                needle=TASK, progress=False, programs=programs)
    first = dict(names)
    names.clear()
    harness.run_retrieval("mkniah", model, hay, built, [300, 400], [0.0, 1.0], False, kw,
                          num_keys=2, progress=False, programs=programs)
    second = dict(names)
  assert first.get("jit(prefill_step)") == 2 and first.get("jit(decode)") == 2, first
  assert "jit(prefill_step)" not in second and "jit(decode)" not in second, second
  assert len(programs) == 2 and doc["seconds"]["compile"] > 0
  # the same cells through the plain jitted path
  cells = niah.build_cells(hay, tok, TASK, [300, 400], [0.0, 1.0], grid.PromptFormat())
  gen = GenSettings.for_lengths(400, CFG, **kw)
  bm = built[1]
  p = llama.apply_head_mask(params, bm.mask)
  batch = [c.prompt for c in cells if c.length == 400]
  plain = greedy_generate(p, CFG, batch, bm.mask, gen)
  aot = greedy_generate(p, CFG, batch, bm.mask, gen, programs=programs)
  assert aot == plain
  rows = [r for r in doc["cells"] if r["method"] == bm.method.name and r["length"] == 400]
  assert [r["output"] for r in rows] == [tok.decode(x, skip_special_tokens=True) for x in plain]


def test_eval_table_smoke(ckpt, tmp_path, monkeypatch, capsys):
  """The grid driver (infer/eval_table.py) end to end: 2 short lengths x 2 methods,
  every task, a held-out perplexity text, the table, and the table again from JSON."""
  from infer import eval_table
  monkeypatch.setenv("DUOJAX_COMPILE_CACHE", "0")
  d, out = ckpt, tmp_path / "grid"
  held = tmp_path / "held.txt"
  held.write_text(_hay_text(60).replace("Line", "Row"))
  rc = eval_table.main(["--ckpt", str(d / "ck"), "--haystack", str(d / "hay.txt"),
                        "--ppl-haystack", str(held), "--attention", "full,streaming",
                        "--tasks", "niah,mkniah,passkey,ppl", "--keys", "2", "--sink", "4",
                        "--recent", "16", "--lengths", "300,400", "--depths", "2",
                        "--max-new-tokens", "3", "--prefill-chunk", "64", "--ppl-samples", "1",
                        "--sparsities", "0.5", "--out", str(out), "--no-progress"])
  assert rc == 0, capsys.readouterr().err
  md = (out / "table.md").read_text()
  for col in ("NIAH ROUGE-1 %", "multi-key NIAH (2 keys) exact %", "passkey %", "ppl @400"):
    assert col in md
  assert "| full |" in md and "| streaming |" in md and str(held) in md
  for task in ("niah", "mkniah", "passkey", "ppl"):
    assert (out / f"{task}.json").is_file() and (out / f"{task}.png").stat().st_size > 2000
  mk = json.loads((out / "mkniah.json").read_text())
  assert mk["plot_metric"] == "exact" and len(mk["cells"]) == 2 * 2 * 2
  assert json.loads((out / "ppl.json").read_text())["settings"]["haystack"] == str(held)
  capsys.readouterr()
  assert eval_table.main(["--render", str(out)]) == 0
  assert capsys.readouterr().out.strip() == md.strip()


def test_eval_table_kv_dtype(ckpt, tmp_path, monkeypatch, capsys):
  """--kv-dtype reaches every method's cache: the settings say int8 and the table's KV
  column is the int8 cache (codes + a float32 scale and zero per token per KV head),
  counted here by hand, not by kv_cache_bytes."""
  from infer import eval_table
  from duojax.checkpoint.store import load_config
  monkeypatch.setenv("DUOJAX_COMPILE_CACHE", "0")
  out = tmp_path / "grid8"
  rc = eval_table.main(["--ckpt", str(ckpt / "ck"), "--haystack", str(ckpt / "hay.txt"),
                        "--attention", "full", "--tasks", "passkey", "--lengths", "300",
                        "--depths", "1", "--max-new-tokens", "3", "--prefill-chunk", "64",
                        "--kv-dtype", "int8", "--out", str(out), "--no-progress"])
  assert rc == 0, capsys.readouterr().err
  assert json.loads((out / "passkey.json").read_text())["settings"]["kv_dtype"] == "int8"
  md = (out / "table.md").read_text()
  assert "KV cache @300, int8 (MiB)" in md
  row = json.loads((out / "table.json").read_text())["methods"][0]
  c = load_config(ckpt / "ck")
  per_layer = 2 * (300 * c.num_kv_heads * c.head_dim + 2 * 4 * 300 * c.num_kv_heads)
  assert abs(row["kv_mib"] * 2**20 - (c.num_layers * per_layer + 4)) < 1


def test_ppl_precompiled_steps_match_the_jitted_path(params, hay):
  built = M.build_methods(M.parse_methods("full,streaming"), CFG, None, 4, 8)
  with _CompileLog() as names:
    doc = ppl.evaluate(params, CFG, hay, built, 80, 1, [], chunk=32, progress=False)
  assert names.get("jit(_nll_step)") == 2, dict(names)  # one per method, up front
  win = np.stack([hay.take(80, doc["windows"][0])])
  for bm in built:
    p = params if bm.mask is None else llama.apply_head_mask(params, bm.mask)
    nll = ppl.token_nll(p, CFG, win, bm.mask, 32)
    assert doc["results"][bm.method.name]["ppl"] == pytest.approx(float(np.exp(nll.mean())),
                                                                  rel=1e-5)
  assert doc["results"]["full"]["ppl"] != doc["results"]["streaming"]["ppl"]


def test_ppl_at_the_full_context(params, hay):
  """A window as long as the model's context is allowed (32K on a 32K model)."""
  cfg = tiny_config(vocab_size=128, max_position_embeddings=96)
  built = M.build_methods(M.parse_methods("full"), cfg, None, 4, 8)
  doc = ppl.evaluate(params, cfg, hay, built, 96, 1, [48], chunk=32, progress=False)
  assert doc["length"] == 96 and np.isfinite(doc["results"]["full"]["ppl"])
  with pytest.raises(ValueError, match="exceeds the model's context"):
    ppl.evaluate(params, cfg, hay, built, 97, 1, [], chunk=32, progress=False)
