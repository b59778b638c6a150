"""The package's import graph (read with `ast`, nothing imported): one-way layers, no cycles, and
function-local imports only for the optional heavy dependencies that WORKSPACE.md names."""
import ast
import collections
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PKG = ROOT / "lladav_jax"

# Lowest first. A module may import modules of lower layers, and of its own layer only inside its own
# package (model.lladav -> model.llm, data.pipeline -> data.records); never a higher layer.
LAYERS = [
    ("config",),
    ("sharding",),
    ("model",),
    ("multimodal",),
    ("batch",),
    ("data",),
    ("weights",),
    ("inference",),  # a prompt to an answer: no HTTP, no command line
    ("api", ""),  # "" = the package's __init__ (re-exports LLaDAV)
    ("eval",),
    ("training",),
    ("convert", "generate", "train"),  # the command lines
    ("serve",),  # the server
]

# Inside packages that are layered themselves, lowest first; the package's __init__ may import any of them.
SUBLAYERS = {
    "inference": [("engine",), ("model", "params", "text"), ("prompts",), ("features",), ("runner",),
                  ("generation", "elbo", "scheduler")],
    "inference.engine": [("config",), ("schedule", "decode", "dllm_cache"), ("state",), ("forward",), ("loop",)],
    "serve": [("config", "protocol", "images"), ("metrics",), ("serving_chat",), ("app",), ("__main__",)],
}

# The command lines: what `python -m` runs. No library module imports one.
CLI_MODULES = {"lladav_jax.convert", "lladav_jax.generate", "lladav_jax.train", "lladav_jax.eval.__main__",
               "lladav_jax.serve.__main__"}

# Imported inside functions on purpose: optional, heavy or slow to import, used by one code path.
# WORKSPACE.md names each (test_optional_imports_are_documented).
OPTIONAL = {"orbax", "etils", "safetensors", "tensorboardX", "tqdm", "yaml", "av", "array_record",
            "tensorflow_datasets", "matplotlib", "lmms_eval", "absl", "jax.experimental"}


def _modules() -> dict[str, pathlib.Path]:
  out = {}
  for f in PKG.rglob("*.py"):
    parts = f.relative_to(ROOT).with_suffix("").parts
    name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    out[name] = f
  return out


def _imports(name: str, f: pathlib.Path, mods) -> list[tuple[str, bool, int]]:
  """(imported module, whether inside a function, line) for every import in `f`."""
  tree = ast.parse(f.read_text(), str(f))
  local = set()
  for node in ast.walk(tree):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      local.update(id(n) for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom)))
  is_pkg = f.name == "__init__.py"
  out = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        pkg = name.split(".") if is_pkg else name.split(".")[:-1]
        pkg = pkg[:len(pkg) - node.level + 1]
        base = ".".join(pkg + ([base] if base else []))
      targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
    else:
      continue
    out += [(t, id(node) in local, node.lineno) for t in targets]
  return out


def _layer(mod: str) -> tuple[int, str]:
  rest = mod.split(".", 1)[1] if "." in mod else ""
  top = rest.split(".")[0]
  for i, names in enumerate(LAYERS):
    if top in names:
      return i, top
  raise AssertionError(f"module {mod} is in no layer of tests/test_layering.py: add it to LAYERS")


def _graph():
  mods = _modules()
  edges = collections.defaultdict(set)
  for name, f in mods.items():
    for target, _, _ in _imports(name, f, mods):
      if target.startswith("lladav_jax") and target != name:
        edges[name].add(target if target in mods else target.rsplit(".", 1)[0])
  return mods, edges


def test_imports_go_one_way_down_the_layers():
  _, edges = _graph()
  bad = []
  for src, dsts in edges.items():
    (ls, ps) = _layer(src)
    for dst in dsts:
      (ld, pd) = _layer(dst)
      if ld > ls or (ld == ls and ps != pd and "" not in (ps, pd)):
        bad.append(f"{src} (layer {ls}) imports {dst} (layer {ld})")
  assert not bad, "upward imports:\n  " + "\n  ".join(sorted(bad))


def _sublayer(mod: str) -> tuple[str, int] | None:
  """(package, sublayer index) of a module of a layered package (None for the package's __init__ or
  a module outside one); the innermost layered package wins."""
  rest = mod.split(".", 1)[1] if "." in mod else ""
  for pkg in sorted(SUBLAYERS, key=len, reverse=True):
    if rest.startswith(pkg + "."):
      top = rest[len(pkg) + 1:].split(".")[0]
      for i, names in enumerate(SUBLAYERS[pkg]):
        if top in names:
          return pkg, i
      raise AssertionError(f"module {mod} is in no sublayer of {pkg} in tests/test_layering.py: add it")
  return None


def test_imports_go_one_way_down_the_sublayers():
  _, edges = _graph()
  bad = []
  for src, dsts in edges.items():
    s = _sublayer(src)
    for dst in dsts:
      d = _sublayer(dst)
      if s and d and s[0] == d[0] and d[1] > s[1]:
        bad.append(f"{src} ({s[0]} layer {s[1]}) imports {dst} (layer {d[1]})")
  assert not bad, "upward imports:\n  " + "\n  ".join(sorted(bad))


def test_no_library_module_imports_a_command_line():
  _, edges = _graph()
  bad = [f"{src} imports {dst}" for src, dsts in edges.items() for dst in dsts
         if dst in CLI_MODULES and src not in CLI_MODULES]
  assert not bad, "\n  ".join(bad)


def test_no_import_cycles():
  _, edges = _graph()
  state: dict[str, int] = {}
  stack: list[str] = []
  cycles = []

  def visit(n):
    state[n] = 1
    stack.append(n)
    for m in sorted(edges.get(n, ())):
      if state.get(m) == 1:
        cycles.append(stack[stack.index(m):] + [m])
      elif m not in state:
        visit(m)
    stack.pop()
    state[n] = 2

  for n in sorted(edges):
    if n not in state:
      visit(n)
  assert not cycles, "import cycles:\n  " + "\n  ".join(" -> ".join(c) for c in cycles)


def test_function_local_imports_are_only_optional_dependencies():
  mods = _modules()
  bad = []
  for name, f in mods.items():
    for target, local, line in _imports(name, f, mods):
      if not local or (name == "lladav_jax" and target == "lladav_jax.api"):  # the package's lazy LLaDAV
        continue
      if not any(target == o or target.startswith(o + ".") for o in OPTIONAL):
        bad.append(f"{f.relative_to(ROOT)}:{line} imports {target} inside a function")
  assert not bad, "move these to the top of the module:\n  " + "\n  ".join(sorted(bad))


def test_optional_imports_are_documented():
  text = (ROOT / "WORKSPACE.md").read_text()
  missing = sorted(o for o in OPTIONAL if f"`{o}`" not in text)
  assert not missing, f"WORKSPACE.md does not name these optional imports: {missing}"


def test_the_checker_sees_a_cycle_and_an_upward_import(tmp_path):
  """The checks above can fail: a made-up package with a cycle and a model -> api import."""
  pkg = tmp_path / "lladav_jax"
  (pkg / "model").mkdir(parents=True)
  (pkg / "__init__.py").write_text("")
  (pkg / "model" / "__init__.py").write_text("from lladav_jax.model import a\n")
  (pkg / "model" / "a.py").write_text("from lladav_jax.model import b\n")
  (pkg / "model" / "b.py").write_text("from lladav_jax.model import a\nfrom lladav_jax import api\n")
  (pkg / "api.py").write_text("def f():\n  from lladav_jax import model\n")
  real = ROOT, PKG
  globals()["ROOT"], globals()["PKG"] = tmp_path, pkg  # the checks read these module globals
  try:
    _, edges = _graph()
    assert "lladav_jax.model.a" in edges["lladav_jax.model.b"] and "lladav_jax.model.b" in edges["lladav_jax.model.a"]
    for check in (test_no_import_cycles, test_imports_go_one_way_down_the_layers,
                  test_function_local_imports_are_only_optional_dependencies):
      try:
        check()
      except AssertionError:
        continue
      raise AssertionError(f"{check.__name__} passed on a broken package")
  finally:
    globals()["ROOT"], globals()["PKG"] = real
