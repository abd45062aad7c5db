"""notebooks/duojax_colab.ipynb runs top to bottom on CPU with small settings, so it cannot rot.

The notebook is executed by nbclient in a fresh kernel of this very interpreter; a cell
inserted after the `parameters` cell shrinks every size knob (papermill's convention), and
a probe cell appended at the end reports the notebook's variables as JSON.
"""

import ast
import json
import os
import sys
from pathlib import Path

import pytest

# The notebook runner is in the test extra only: without it (e.g. a GPU box that runs
# `pytest -k gpu` on a bare install) this module skips instead of failing collection.
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("nbclient")
from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402
from jupyter_client.manager import KernelManager  # noqa: E402
from nbclient import NotebookClient  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "duojax_colab.ipynb"
ESSAYS = REPO.parent / "shared" / "data" / "paul_graham_essays"
PROBE = "DUOJAX_NOTEBOOK_RESULT "

# CPU-sized: a ~450-token chat prompt, 2 training steps at 250-300 context tokens (+ a
# ~60-token passkey tail, padded to one bucket of 384: one compile), NIAH 300/600 x 2 depths.
SMALL = {
    "GEN_CONTEXT_TOKENS": 400, "GEN_ATTENTION": ["full", "duo"], "MAX_NEW_TOKENS": 8,
    "SINK": 32, "RECENT": 64, "PREFILL_CHUNK": 512,
    "TRAIN_STEPS": 2, "TRAIN_MIN_LEN": 250, "TRAIN_MAX_LEN": 300, "TRAIN_LEN_INTERVALS": 2,
    "TRAIN_NUM_PASSKEYS": 2, "TRAIN_PASSKEY_WORDS": 4, "TRAIN_SINK": 32, "TRAIN_RECENT": 64,
    "TRAIN_PAD_MULTIPLE": 384,
    # a chunk of 320: the 300-token prompts take one prefill step, the 600-token ones two
    "NIAH_LENGTHS": "300,600", "NIAH_DEPTHS": "0.25,0.75", "NIAH_MAX_NEW_TOKENS": 6,
    "NIAH_PREFILL_CHUNK": 320, "NIAH_BATCH": 2,
}

PROBE_CELL = f"""
import json
print({PROBE!r} + json.dumps({{
    "platform": PLATFORM, "backend": BACKEND, "dtype": DTYPE_NAME, "hay_path": str(HAY_PATH),
    "gen": GEN, "steps": int(state.step), "gates_shape": list(GATES.shape),
    "out": str(OUT), "run_dir": str(RUN_DIR)}}))
"""


def _kernel_manager(tmp_path: Path) -> KernelManager:
  """A kernel of sys.executable, whatever kernelspecs the machine has.

  A fresh `pip install -e ".[test]"` does have a `python3` kernelspec (ipykernel ships it,
  and jupyter_client runs its bare `python` as sys.executable), but a user-level `python3`
  spec (~/.local/share/jupyter) takes precedence and may name another interpreter; this
  spec cannot.
  """
  spec = tmp_path / "kernels" / "duojax-test"
  spec.mkdir(parents=True)
  (spec / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "duojax test", "language": "python"}))
  ksm = KernelSpecManager(kernel_dirs=[str(spec.parent)])
  return KernelManager(kernel_name="duojax-test", kernel_spec_manager=ksm)


def _with_small_settings(nb, out_dir: Path):
  tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
  assert len(tagged) == 1, "the notebook needs exactly one cell tagged `parameters`"
  params = {**SMALL, "OUT_DIR": str(out_dir)}
  src = "# injected by tests/test_notebook.py\n" + "\n".join(
      f"{k} = {v!r}" for k, v in params.items())
  cell = nbformat.v4.new_code_cell(src, metadata={"tags": ["injected-parameters"]})
  cell.id = "injected-parameters"
  nb.cells.insert(tagged[0] + 1, cell)
  probe = nbformat.v4.new_code_cell(PROBE_CELL.strip())
  probe.id = "test-probe"
  nb.cells.append(probe)
  return nb


def test_committed_notebook_is_clean():
  """Outputs stay out of git, and every knob the test sets exists in the parameters cell."""
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  for c in nb.cells:
    if c.cell_type == "code":
      assert not c.outputs and c.execution_count is None, "clear the notebook's outputs"
  params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
  names = {n.id for node in ast.walk(ast.parse(params.source)) if isinstance(node, ast.Assign)
           for t in node.targets for n in ast.walk(t) if isinstance(n, ast.Name)}
  assert set(SMALL) <= names, sorted(set(SMALL) - names)


def test_notebook_runs_on_cpu(duojax_home, tmp_path):
  from duojax.checkpoint.embedded import embedded_gguf
  from duojax.checkpoint.hf import CheckpointError
  if not ESSAYS.is_dir():
    pytest.skip(f"{ESSAYS} not found (CI keeps shared/ beside the clone)")
  try:
    embedded_gguf("smollm2-135m")
  except CheckpointError as e:
    pytest.skip(str(e))

  nb = _with_small_settings(nbformat.read(NOTEBOOK, as_version=4), tmp_path / "out")
  env = {k: v for k, v in os.environ.items() if k != "DUOJAX_HAYSTACK"}  # test the default
  env.update(DUOJAX_HOME=str(duojax_home), JAX_PLATFORMS="cpu", MPLBACKEND="Agg")
  client = NotebookClient(nb, km=_kernel_manager(tmp_path), timeout=600, startup_timeout=120,
                          resources={"metadata": {"path": str(NOTEBOOK.parent)}})
  client.execute(env=env)  # raises CellExecutionError, with the cell's traceback, on failure

  text = "".join(o.get("text", "") for o in nb.cells[-1].outputs if o.output_type == "stream")
  res = json.loads(text.split(PROBE, 1)[1].splitlines()[0])
  assert (res["platform"], res["backend"], res["dtype"]) == ("cpu", "xla", "float32")
  assert Path(res["hay_path"]).resolve() == ESSAYS.resolve()  # found beside the repository

  # generation: both kinds answered the same prompt, and duo's cache is smaller at 8K
  gen = res["gen"]
  assert set(gen) == {"full", "duo"}
  assert gen["full"]["prompt_tokens"] == gen["duo"]["prompt_tokens"] > 400
  for g in gen.values():
    assert g["text"].strip() and g["kv_cache_bytes"] > 0
  assert gen["full"]["retrieval_head_fraction"] == 1.0
  assert 0 < gen["duo"]["retrieval_head_fraction"] < 1
  assert gen["duo"]["kv_bytes_full_context"] < gen["full"]["kv_bytes_full_context"] / 1.5

  # gate training: the steps ran, the pattern and the heatmaps were written
  run_dir, out = Path(res["run_dir"]), Path(res["out"])
  assert res["steps"] == SMALL["TRAIN_STEPS"] and res["gates_shape"] == [30, 3]
  log = [json.loads(l) for l in (run_dir / "log.jsonl").read_text().splitlines()]
  assert [r["step"] for r in log] == [1, 2] and all(r["tokens"] == 384 for r in log)
  assert (run_dir / "pattern" / "full_attention_heads.tsv").is_file()
  for png in (run_dir / "gates.png", out / "shipped_gates.png", out / "niah.png"):
    assert png.stat().st_size > 1000, png

  # NIAH: 3 methods x 2 lengths x 2 depths, each with an answer
  doc = json.loads((out / "niah.json").read_text())
  cells = {(c["method"], c["length"], c["depth"]) for c in doc["cells"]}
  assert cells == {(m, l, d) for m in ("full", "duo", "streaming") for l in (300, 600)
                   for d in (0.25, 0.75)}
  assert all(c["output"].strip() for c in doc["cells"])
  summary = doc["summary"][doc["plot_metric"]]
  assert set(summary) == {"full", "duo", "streaming"}
  assert all(len(s["grid"]) == 2 and len(s["grid"][0]) == 2 for s in summary.values())
  # the figures were shown inline, not only written
  images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
  assert len(images) >= 3
