"""The import rules that keep the rooms apart: no cycle between the cache and the
compensation feature, a dispatch that knows no cache class nor feature, kernels that know
nothing above attention, and cache kinds that bring their own attention."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _duojax_imports(path: Path) -> set[str]:
  """The duojax modules a file imports (anywhere in it, lazy imports included)."""
  out = set()
  for n in ast.walk(ast.parse(path.read_text())):
    if isinstance(n, ast.Import):
      out |= {a.name for a in n.names if a.name.startswith("duojax")}
    elif isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("duojax"):
      out |= {n.module} | {f"{n.module}.{a.name}" for a in n.names}
  return out


def test_dispatch_imports_only_the_reference():
  assert _duojax_imports(ROOT / "duojax/attention/dispatch.py") <= {
      "duojax.attention", "duojax.attention.reference"}


def test_cache_does_not_import_compensation():
  assert not any("compensation" in m for m in _duojax_imports(ROOT / "duojax/cache.py"))


def test_kernels_import_nothing_above_attention():
  for p in (ROOT / "duojax/kernels").rglob("*.py"):
    above = {m for m in _duojax_imports(p) if not m.startswith("duojax.kernels")}
    assert not above, f"{p.relative_to(ROOT)} imports {sorted(above)}"


def test_compensated_cache_needs_its_module_and_says_so():
  """A fresh interpreter: importing the cache pulls in no feature, and asking for the
  compensated kind before its module is imported names that module."""
  code = ("import sys\n"
          "import duojax.cache as kvc\n"
          "from duojax.config import tiny_config\n"
          "from duojax.pattern import HeadMask\n"
          "import numpy as np\n"
          "assert 'duojax.compensation' not in sys.modules\n"
          "cfg = tiny_config()\n"
          "m = HeadMask.from_array(np.array([[True, False]] * cfg.num_layers), 2, 3)\n"
          "try:\n"
          "  kvc.init_cache(cfg, 1, 8, m, compensation=True)\n"
          "  raise SystemExit('no error')\n"
          "except ValueError as e:\n"
          "  assert 'import duojax.compensation' in str(e), e\n"
          "import duojax.compensation as comp\n"
          "c = kvc.init_cache(cfg, 1, 8, m, compensation=True)\n"
          "assert isinstance(c.layers[0].stream, comp.CompLayerCache)\n")
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                     env={**os.environ, "JAX_PLATFORMS": "cpu"}, cwd=ROOT)
  assert r.returncode == 0, r.stderr


def test_attend_routes_by_cache_kind_and_refuses_unknown_kinds():
  from duojax import cache as kvc
  from duojax.attention import dispatch

  class Odd:
    pass

  q = jnp.zeros((1, 1, 1, 1, 4))
  k = jnp.zeros((1, 1, 1, 4))
  z = jnp.zeros((1,), jnp.int32)
  with pytest.raises(TypeError, match="register_cache_attention"):
    dispatch.attend(Odd(), q, k, k, z, z + 1)
  seen = []
  dispatch.register_cache_attention(Odd, lambda c, *a: seen.append(a[-1]) or ("out", c))
  c = Odd()
  assert dispatch.attend(c, q, k, k, z, z + 1, "xla") == ("out", c) and seen == ["xla"]
  full = kvc.FullLayerCache(jnp.zeros((1, 4, 1, 4)), jnp.zeros((1, 4, 1, 4)))
  out, new = dispatch.attend(full, q + 1, k + 1, k + 2, z, z + 1)
  assert isinstance(new, kvc.FullLayerCache) and float(out.sum()) == 8.0  # v = 2, D = 4


# Each room of duojax/ and the rooms it may import (README "Architecture"). Downward only:
# kernels and attention know nothing of caches or models; the model nothing of checkpoints,
# training or serving; checkpoint/ nothing of the model; only the CLIs and `duojax/__init__`
# (lazily) sit above everything.
ROOMS = {
    "config": set(), "layout": {"config"}, "pattern": {"config"}, "validate": {"config"},
    "kernels": set(), "kv_quant": set(), "attention": {"kv_quant"},
    "cache": {"attention", "config", "kv_quant"},
    "compensation": {"attention", "cache", "config"},
    "sharding": {"cache", "compensation", "config", "kv_quant", "layout"},
    "context_parallel": {"attention", "cache", "config", "kv_quant", "sharding"},
    "model": {"attention", "cache", "config", "layout"},
    "engine": {"attention", "cache", "compensation", "config", "context_parallel", "model",
               "sharding"},
    "checkpoint": {"config", "layout", "pattern"},
    "data": {"config"},
    "serving": {"checkpoint", "config", "engine", "model", "pattern"},
    "identify": {"attention", "cache", "checkpoint", "config", "data", "engine", "model",
                 "pattern", "serving", "sharding", "validate"},
    "eval": {"attention", "cache", "checkpoint", "config", "data", "engine", "identify",
             "kv_quant", "model", "pattern", "serving", "sharding", "validate"},
    "infer": {"attention", "checkpoint", "config", "engine", "kv_quant", "pattern", "serving",
              "sharding", "validate"},
    "convert": {"checkpoint", "config"},
}


def _room(module: str) -> str:
  parts = module.split(".")
  return parts[1] if len(parts) > 1 else "duojax"


def _room_imports() -> dict[str, set[str]]:
  out: dict[str, set[str]] = {}
  for p in (ROOT / "duojax").rglob("*.py"):
    mod = ".".join(p.relative_to(ROOT).with_suffix("").parts)
    room = _room(mod.removesuffix(".__init__"))
    for n in ast.walk(ast.parse(p.read_text())):
      if isinstance(n, ast.Import):
        targets = [a.name for a in n.names]
      elif isinstance(n, ast.ImportFrom) and n.module:
        targets = ([f"duojax.{a.name}" for a in n.names] if n.module == "duojax"
                   else [n.module])
      else:
        continue
      out.setdefault(room, set()).update(
          _room(t) for t in targets if t.startswith("duojax.") and _room(t) != room)
  return out


def test_every_room_imports_only_downward():
  graph = _room_imports()
  assert set(graph) - {"duojax"} <= set(ROOMS), f"rooms not in the table: {set(graph) - set(ROOMS)}"
  for room, deps in graph.items():
    if room == "duojax":  # the lazy public face
      continue
    assert deps <= ROOMS[room], f"duojax/{room} imports {sorted(deps - ROOMS[room])}"


def test_the_room_table_has_no_cycle():
  seen, done = set(), set()

  def visit(r, path):
    assert r not in seen or r in done, f"import cycle: {' -> '.join(path + [r])}"
    if r in done:
      return
    seen.add(r)
    for d in ROOMS.get(r, ()):
      visit(d, path + [r])
    done.add(r)

  for r in ROOMS:
    visit(r, [])
