"""The DuoAttention pipeline on tiny Qwen2 (q/k/v biases) and Qwen3 (q/k norms) configs:
gate training, and the eval CLI grid (NIAH, passkey, ppl) as a CPU smoke of the Qwen
evaluation that runs on the GPU at 4K-32K tokens."""

import json

import numpy as np
import pytest

from duojax.config import tiny_config
from duojax.data.haystack import HaystackTokens
from duojax.identify import duo
from duojax.pattern import random_pattern
from helpers import random_params
from test_eval import _hay_text, char_tokenizer
from test_identify_duo import TEXT, CharTok

QWEN = {"qwen2": tiny_config(architecture="qwen2", attention_bias=True, num_layers=2,
                             rope_theta=1e6, max_position_embeddings=1024, vocab_size=128),
        "qwen3": tiny_config(architecture="qwen3", qk_norm=True, num_layers=2, head_dim=12,
                             rope_theta=1e6, max_position_embeddings=1024, vocab_size=128)}
TC = duo.GateTrainConfig(steps=6, batch_size=1, min_len=250, max_len=330, len_intervals=2,
                         num_passkeys=1, passkey_words=2, sink=4, recent=8, pad_multiple=128,
                         save_every=100, dtype="float32", lr=0.05)


@pytest.mark.parametrize("name", list(QWEN))
def test_gate_training_runs_on_qwen(name, tmp_path):
  cfg = QWEN[name]
  params = random_params(cfg, 0, 0.3)
  hay = HaystackTokens(TEXT, CharTok(), line_breaks=False)
  state = duo.train_gates(params, cfg, CharTok(), hay, TC, tmp_path, progress=False)
  log = [json.loads(l) for l in (tmp_path / "log.jsonl").read_text().splitlines()]
  assert len(log) == TC.steps and np.isfinite([r["loss"] for r in log]).all()
  assert log[-1]["loss"] < log[0]["loss"]
  g = np.asarray(state.gates)
  assert g.shape == (cfg.num_layers, cfg.num_kv_heads) and (g >= 0).all() and (g <= 1).all()


def test_eval_cli_grid_on_a_qwen2_checkpoint(tmp_path, capsys):
  from duojax.checkpoint import store
  from duojax.eval.__main__ import main
  cfg = QWEN["qwen2"]
  params = random_params(cfg, 1, 0.2)
  store.save_checkpoint(tmp_path / "ck", cfg, params, char_tokenizer())
  (tmp_path / "hay.txt").write_text(_hay_text())
  random_pattern(cfg.num_layers, cfg.num_kv_heads, seed=9, sink=4, recent=16).save(tmp_path / "pat")
  base = ["--ckpt", str(tmp_path / "ck"), "--haystack", str(tmp_path / "hay.txt"), "--sink", "4",
          "--recent", "16", "--prefill-chunk", "64", "--no-progress"]
  rc = main(["niah", *base, "--attention", "full,duo,streaming", "--pattern", str(tmp_path / "pat"),
             "--sparsity", "0.5", "--lengths", "300", "--depths", "2", "--max-new-tokens", "3",
             "--out", str(tmp_path / "n.json")])
  assert rc == 0, capsys.readouterr().err
  doc = json.loads((tmp_path / "n.json").read_text())
  assert [m["name"] for m in doc["methods"]] == ["full", "duo@0.5", "streaming"]
  assert len(doc["cells"]) == 3 * 1 * 2
  rc = main(["passkey", *base, "--attention", "full,duo@0.5", "--pattern", str(tmp_path / "pat"),
             "--lengths", "250", "--depths", "0,1", "--no-chat", "--max-new-tokens", "3",
             "--out", str(tmp_path / "p.json")])
  assert rc == 0
  rc = main(["ppl", *base, "--attention", "full,duo@0.5", "--pattern", str(tmp_path / "pat"),
             "--lengths", "64,128", "--samples", "1", "--out", str(tmp_path / "q.json")])
  assert rc == 0
  q = json.loads((tmp_path / "q.json").read_text())["results"]
  assert np.isfinite(q["full"]["bands"][0]["ppl"]) and set(q) == {"full", "duo@0.5"}


def test_qwen_gate_training_config_parses():
  """configs/qwen25_coder_duo.yaml holds only GateTrainConfig fields and job fields."""
  from pathlib import Path
  import yaml
  d = yaml.safe_load((Path(__file__).parents[1] / "configs" / "qwen25_coder_duo.yaml").read_text())
  assert d.pop("ckpt") == "qwen2.5-coder-0.5b"
  tc = duo.GateTrainConfig(**d)
  assert tc.max_len <= 32768 and tc.min_len < tc.max_len
  # the shipped pattern's recipe: gates started at 0.9 with reg 0.3 (README, "Its pattern")
  assert (tc.init_gate, tc.reg) == (0.9, 0.3)


def test_identify_flags_override_the_config():
  """--init-gate / --reg on the command line beat the YAML: the earlier recipe (gates from 1,
  reg 0.05) is the shipped config plus two flags."""
  from pathlib import Path
  from duojax.identify.__main__ import _settings, duo_parser
  cfg = Path(__file__).parents[1] / "configs" / "qwen25_coder_duo.yaml"
  a = duo_parser().parse_args(["--config", str(cfg), "--init-gate", "1.0", "--reg", "0.05",
                               "--haystack", "h", "--out", "o"])
  fields, job = _settings(a)
  tc = duo.GateTrainConfig.from_dict(fields)
  assert (tc.init_gate, tc.reg, tc.steps) == (1.0, 0.05, 400)
  assert job["ckpt"] == "qwen2.5-coder-0.5b" and job["out"] == "o"
