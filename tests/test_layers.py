"""The import graph of llm/: layered (import-linter's contracts in pyproject.toml), no project module
imported inside a function (a cycle in hiding), and the CLI starts without the heavy frameworks."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "ray", "transformers", "deepspeed", "peft")


def test_the_layer_contracts_hold() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    out = subprocess.run([str(lint), "--config", str(ROOT / "pyproject.toml")], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "BROKEN" not in out.stdout and "KEPT" in out.stdout


def _local_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level:
                names = ["llm (relative)"]
            found += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names if n == "llm" or
                      n.startswith(("llm.", "llm (relative)"))]
    return found


def test_no_project_module_is_imported_inside_a_function() -> None:
    found = [hit for path in sorted((ROOT / "llm").rglob("*.py")) for hit in _local_imports(path)]
    assert not found, "move the definition down a layer instead:\n" + "\n".join(found)


def test_the_cli_imports_no_heavy_framework() -> None:
    code = f"import sys, llm.cli; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "", f"`import llm.cli` imported {out.stdout.strip()}: import them lazily"


def test_ruff_is_clean() -> None:
    """The lint rules in pyproject.toml (RUF100 among them: no `noqa` for a rule that is not enabled)."""
    ruff = Path(sys.executable).with_name("ruff")
    out = subprocess.run([str(ruff), "check", "llm", "tests", "bench", "jobs"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-4000:]
