"""`import duojax` stays light; duojax.load / generate / identify work when first used."""

import json
import os
import subprocess
import sys

import pytest

LIGHT = """
import sys, json
import duojax
heavy = [m for m in ("jax", "jaxlib", "flax", "orbax", "numpy", "transformers", "torch")
         if m in sys.modules]
names = sorted(n for n in dir(duojax) if not n.startswith("_"))
try:
  duojax.no_such_thing
  missing = "no error"
except AttributeError as e:
  missing = str(e)
print(json.dumps({"heavy": heavy, "names": names, "missing": missing}))
"""


def _run(code, **env):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", **env}
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                     env=env)
  assert r.returncode == 0, r.stderr
  return json.loads(r.stdout.strip().splitlines()[-1])


def test_import_duojax_is_light():
  out = _run(LIGHT)
  assert out["heavy"] == [], out["heavy"]
  for n in ("load", "generate", "identify", "Checkpoint", "HeadPattern"):
    assert n in out["names"]
  assert "no attribute 'no_such_thing'" in out["missing"]


def test_lazy_names_resolve_to_the_real_objects():
  import duojax
  from duojax.checkpoint.handle import Checkpoint
  from duojax.pattern import HeadPattern
  assert duojax.Checkpoint is Checkpoint and duojax.HeadPattern is HeadPattern
  assert duojax.identify.duo.train_gates.__module__ == "duojax.identify.duo"
  with pytest.raises(TypeError, match="str or a non-empty list"):
    duojax.generate(None, [])


def test_face_on_the_tiny_embedded_model(tiny_gguf_pkg, tmp_path):
  """load -> generate on a tiny GGUF registered as an embedded model (a fresh process, so
  the lazy path is the one taken), greedy, equal to the engine driven by hand."""
  root, mod, name = tiny_gguf_pkg
  code = f"""
import sys, json
sys.path.insert(0, {str(root)!r})
import duojax
from duojax.checkpoint import embedded
embedded.EMBEDDED["tiny"] = ({mod!r}, {name!r}, "duojax-tiny-model")
m = duojax.load("tiny", attention="full", progress=False)
one = duojax.generate(m, "the cat", max_new_tokens=4)
two = duojax.generate(m, ["the cat", "a hat in the"], max_new_tokens=4)
from duojax import engine
ids = m.encode_prompt("the cat")
r = engine.generate(m.params, m.config, [ids], 4)
eos = set(m.config.eos_token_ids)
ref = m.tokenizer.decode([t for t in r.tokens[0] if t not in eos], skip_special_tokens=True)
ck = duojax.Checkpoint.open("tiny", progress=False)
print(json.dumps({{"one": one, "two": two, "ref": ref, "layers": ck.config.num_layers,
                  "cli_imported": "duojax.convert" in sys.modules}}))
"""
  out = _run(code, DUOJAX_HOME=str(tmp_path / "home"))
  assert isinstance(out["one"], str) and out["one"] == out["ref"]
  assert isinstance(out["two"], list) and len(out["two"]) == 2 and out["two"][0] == out["one"]
  assert out["layers"] == 2
  assert not out["cli_imported"]  # the first-use conversion does not go through the CLI module


@pytest.mark.slow
def test_face_on_smollm2(smollm2_dir):
  import duojax
  m = duojax.load("smollm2-135m", progress=False)
  assert m.attention == "duo" and m.mask is not None  # the shipped pattern
  text = duojax.generate(m, "What is the capital of France?", chat=True, max_new_tokens=12)
  assert "Paris" in text
