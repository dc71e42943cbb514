"""Import rules of the package layering (docs/ARCHITECTURE.md): checked, so that they stay true.

1. `import clinical_bert_jax` loads neither PyTorch nor TensorFlow (JAX users install neither; each costs seconds).
2. `data_prep` may import `clinical_bert_jax`, never the reverse: the two packages must not import each other.
"""

import ast
import json
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "tensorflow", "transformers")


def test_importing_the_package_loads_neither_torch_nor_tensorflow():
  probe = (
    "import json, sys, clinical_bert_jax, clinical_bert_jax.api; "
    f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r}))))"
  )
  result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert json.loads(result.stdout.strip().splitlines()[-1]) == []


def _imported_modules(path: Path) -> set[str]:
  """Absolute module names a file imports, anywhere in it (function-level imports count too)."""
  names = set()
  for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      names.add(node.module)
  return names


def _package_files_importing(prefix: str) -> list[str]:
  return sorted(
    str(path.relative_to(ROOT))
    for path in (ROOT / "clinical_bert_jax").rglob("*.py")
    if any(name == prefix or name.startswith(prefix + ".") for name in _imported_modules(path))
  )


def test_the_static_check_sees_imports():
  assert "clinical_bert_jax/api.py" in _package_files_importing("clinical_bert_jax.tokenization")


def test_clinical_bert_jax_never_imports_data_prep():
  assert _package_files_importing("data_prep") == []


# The command-line layer of each command: the only functions that may read absl's FLAGS. Everything below it takes
# an options object (EvaluateOptions, EmbedOptions, PretrainOptions), so it can be called as a library.
COMMAND_LINE_LAYER = {
  "clinical_bert_jax/evaluate.py": {"main", "from_flags", "define_flags"},
  "clinical_bert_jax/embed.py": {"main", "define_flags"},
  "clinical_bert_jax/pretrain.py": {
    "main",
    "define_flags",
    "options_from_flags",
    "resolved_flagfile",
    "initialize_distributed",
  },
}


def _flags_reads_below_the_command_line(path: Path, allowed: set[str]) -> list[str]:
  """`FLAGS` / `flags.FLAGS` uses outside the allowed top-level functions (module-level `FLAGS = flags.FLAGS` aside)."""
  tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
  found = []
  for top in tree.body:
    if isinstance(top, (ast.FunctionDef, ast.AsyncFunctionDef)) and top.name in allowed:
      continue
    if isinstance(top, ast.Assign) and [ast.unparse(target) for target in top.targets] == ["FLAGS"]:
      continue
    for node in ast.walk(top):
      if (isinstance(node, ast.Name) and node.id == "FLAGS") or (
        isinstance(node, ast.Attribute) and node.attr == "FLAGS"
      ):
        found.append(f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:{node.lineno}")
  return found


def test_the_flags_scan_sees_a_read(tmp_path):
  sample = tmp_path / "sample.py"
  sample.write_text(
    "FLAGS = flags.FLAGS\ndef main(argv):\n  return FLAGS.x\n"
    "class Options:\n  def run(self):\n    return FLAGS['y'].value\n"
  )
  found = _flags_reads_below_the_command_line(sample, {"main"})
  assert [entry.rsplit(":", 1)[1] for entry in found] == ["6"]


def test_no_flags_reads_below_the_command_line_layer():
  found = []
  for relative, allowed in COMMAND_LINE_LAYER.items():
    found += _flags_reads_below_the_command_line(ROOT / relative, allowed)
  assert found == []
