"""Built-in corpora from the Python standard library: real English text on every machine, no download.

- `builtin:python-docs`: the reference manual's topics (`pydoc_data.topics`) plus, per stdlib module, its
  docstrings (module, classes, functions) as one document.
- `builtin:python-sft`: question/answer pairs: a function's name and signature as the question, the first
  paragraph of its docstring as the answer.

Docstrings are read with `ast` from the source files, never by importing the modules: importing the whole
standard library would run side effects (`antigravity` opens a browser) and depend on optional C parts.
"""

from __future__ import annotations

import ast
import sysconfig
from collections.abc import Iterator
from pathlib import Path

_SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "__pycache__",
              "turtledemo", "ensurepip", "venv"}


def stdlib_files() -> list[Path]:
    """The standard library's .py files in a stable order (tests and tools left out)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if not _SKIP_DIRS & set(p.relative_to(root).parts[:-1])]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _module_name(path: str) -> str:
    root = Path(sysconfig.get_paths()["stdlib"])
    rel = Path(path).relative_to(root).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join(parts)


def _parse(path: str) -> ast.Module | None:
    try:
        return ast.parse(Path(path).read_bytes(), filename=path)
    except (SyntaxError, ValueError, OSError):
        return None  # a stdlib file this Python cannot parse (e.g. lib2to3 fixtures): nothing to learn from


def _signature(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    args = ast.unparse(node.args)
    return f"{node.name}({args})"


def topics() -> Iterator[tuple[str, str]]:
    """(key, text) of every topic of the reference manual shipped with Python."""
    from pydoc_data.topics import topics as table

    for key in sorted(table):
        yield f"pydoc_data.topics:{key}", table[key]


def module_document(path: str) -> tuple[str, str] | None:
    """(key, text) of one module: its docstring, then each public class and function with its docstring."""
    tree = _parse(path)
    if tree is None:
        return None
    name = _module_name(path)
    parts = []
    if doc := ast.get_docstring(tree):
        parts.append(f"{name}\n\n{doc}")
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) \
                and not node.name.startswith("_") and (doc := ast.get_docstring(node)):
            title = _signature(node) if not isinstance(node, ast.ClassDef) else f"class {node.name}"
            parts.append(f"{title}\n\n{doc}")
    if not parts:
        return None
    return f"{path}", "\n\n".join(parts)


def sft_pairs(path: str) -> Iterator[tuple[str, dict]]:
    """(key, {"prompt", "response"}) for each public function with a docstring in one stdlib module."""
    tree = _parse(path)
    if tree is None:
        return
    module = _module_name(path)
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and not node.name.startswith("_"):
            doc = ast.get_docstring(node)
            if not doc:
                continue
            answer = doc.strip().split("\n\n")[0].strip()
            if len(answer) < 20:
                continue
            prompt = f"What does `{_signature(node)}` in the `{module}` module do?"
            yield f"{path}:{node.lineno}", {"prompt": prompt, "response": answer}
