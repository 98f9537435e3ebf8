"""The package's layout holds (issue 22): rooms by concept, imports that flow one way, no module
over 700 lines, no reach into another folder's private names, and the README's imports work.

Read from the source (``ast``), not from ``sys.modules``: every import statement counts, those
inside functions too, because a lazy import is still a dependency; only imports under
``if TYPE_CHECKING:`` (annotations, never run) are left out.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 700

#: The one documented exception (DESIGN.md): RAGPipeline's conveniences build an adapter, and
#: import it lazily inside these methods. An adapter never needs them.
ALLOWED_UPWARD = {("nbce_rag.pipeline", fn) for fn in ("as_langchain_retriever", "as_langchain_chat_model",
                                                       "as_query_engine")}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "integrations":
        parts = ["nbce_rag"] + parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _sources() -> Dict[str, Path]:
    mods = {}
    for top in ("nbce_rag", "integrations", "benchmarks"):
        for p in sorted((ROOT / top).rglob("*.py")):
            if "__pycache__" in p.parts or p.is_symlink() or any(q.is_symlink() for q in p.parents if ROOT in q.parents):
                continue
            mods[_module_name(p)] = p
    return mods


MODULES = _sources()


def _is_package(mod: str) -> bool:
    return MODULES.get(mod, Path()).name == "__init__.py"


def _resolve(importer: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = importer.split(".")
    if not _is_package(importer):
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _target(mod: str, importer: str) -> Optional[str]:
    """The module of ours that ``mod`` names, or None for a third-party one."""
    if mod in MODULES:
        return mod
    if importer.startswith("benchmarks.") and f"benchmarks.{mod}" in MODULES:  # scripts import siblings
        return f"benchmarks.{mod}"
    return None


class _Imports(ast.NodeVisitor):
    """Every import of one module: (target module, names taken, enclosing function, line)."""

    def __init__(self, importer: str):
        self.importer = importer
        self.found: List[Tuple[str, List[str], Optional[str], int]] = []
        self._fn: List[str] = []
        self._aliases: Dict[str, str] = {}  # a name bound to one of our modules -> that module

    def _visit_fn(self, node):
        self._fn.append(node.name)
        self.generic_visit(node)
        self._fn.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = _visit_fn

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        if (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
                isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"):
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)

    def _add(self, target: Optional[str], names: List[str], line: int) -> None:
        if target is not None and target != self.importer:
            self.found.append((target, names, self._fn[0] if self._fn else None, line))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            target = _target(alias.name, self.importer)
            self._add(target, [], node.lineno)
            if target is not None and alias.asname:
                self._aliases[alias.asname] = target

    def visit_Attribute(self, node: ast.Attribute) -> None:
        """``module._name`` through a module bound by ``import ... as`` / ``from pkg import module``."""
        if isinstance(node.value, ast.Name) and node.value.id in self._aliases:
            self._add(self._aliases[node.value.id], [node.attr], node.lineno)
        self.generic_visit(node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = _resolve(self.importer, node)
        plain = []
        for alias in node.names:
            sub = _target(f"{base}.{alias.name}", self.importer)
            if sub is not None:  # `from package import module`
                self._add(sub, [], node.lineno)
                self._aliases[alias.asname or alias.name] = sub
            else:
                plain.append(alias.name)
        if plain:
            self._add(_target(base, self.importer), plain, node.lineno)


def _imports() -> Dict[str, List[Tuple[str, List[str], Optional[str], int]]]:
    out = {}
    for mod, path in MODULES.items():
        v = _Imports(mod)
        v.visit(ast.parse(path.read_text(encoding="utf-8"), str(path)))
        out[mod] = v.found
    return out


IMPORTS = _imports()


def _graph() -> Dict[str, Set[str]]:
    g: Dict[str, Set[str]] = {m: set() for m in MODULES}
    for mod, found in IMPORTS.items():
        for target, _names, fn, _line in found:
            if (mod, fn) in ALLOWED_UPWARD:
                continue
            g[mod].add(target)
    return g


def _cycles(g: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on: Set[str] = set()
    out: List[List[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(g[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_the_checker_sees_a_circle_and_a_lazy_import():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(g) == [["a", "b", "c"]]
    v = _Imports("nbce_rag.decoding.decoder")
    v.visit(ast.parse("def f():\n    from .kvcache import plan_prefill\n"))
    assert v.found == [("nbce_rag.decoding.kvcache", ["plan_prefill"], "f", 2)]


def test_the_three_rooms_exist():
    for room in ("retrieval", "filtering", "decoding"):
        init = ROOT / "nbce_rag" / room / "__init__.py"
        assert init.is_file(), room
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and "May import" in doc, f"nbce_rag/{room}/__init__.py says its story and what it may import"
        assert len(list(init.parent.glob("*.py"))) >= 4, f"nbce_rag/{room}/ holds its concept's modules"


def test_no_import_circle():
    cycles = _cycles(_graph())
    assert not cycles, "import circles (every import counts, lazy ones too): " + "; ".join(
        " <-> ".join(c) for c in cycles)


def test_rooms_import_in_one_direction():
    """retrieval is the lowest room; filtering and decoding stand on it, side by side."""
    never = {
        "nbce_rag.retrieval": ("nbce_rag.filtering", "nbce_rag.decoding", "nbce_rag.pipeline", "nbce_rag.integrations",
                               "nbce_rag.commands", "nbce_rag.cli"),
        "nbce_rag.filtering": ("nbce_rag.decoding", "nbce_rag.pipeline", "nbce_rag.integrations", "nbce_rag.commands",
                               "nbce_rag.cli"),
        "nbce_rag.decoding": ("nbce_rag.filtering", "nbce_rag.pipeline", "nbce_rag.integrations", "nbce_rag.commands",
                              "nbce_rag.cli"),
    }
    bad = []
    for mod, found in IMPORTS.items():
        for room, banned in never.items():
            if mod == room or mod.startswith(room + "."):
                bad += [f"{mod}:{line} imports {t}" for t, _n, _fn, line in found
                        if any(t == b or t.startswith(b + ".") for b in banned)]
    assert not bad, bad


def _folder(mod: str) -> str:
    return str(MODULES[mod].parent)


def test_no_private_name_from_another_folder():
    bad = []
    for mod, found in IMPORTS.items():
        for target, names, _fn, line in found:
            if _folder(target) == _folder(mod):
                continue
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if target.rsplit(".", 1)[-1].startswith("_") and not target.endswith("__init__"):
                private.append(f"(module {target})")
            bad += [f"{MODULES[mod].relative_to(ROOT)}:{line} takes {n} from {target}" for n in private]
    assert not bad, bad


def test_no_module_over_700_lines():
    long = {str(p.relative_to(ROOT)): n for p in MODULES.values()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"split along the story: {long}"


def test_old_module_paths_still_import_as_the_same_module():
    import importlib

    import nbce_rag.decoding.decoder as new

    with pytest.warns(DeprecationWarning, match="nbce_rag.decoding.decoder"):
        old = importlib.import_module("nbce_rag.decoder")
    assert old is new
    assert new.__spec__.name == "nbce_rag.decoding.decoder"
    from nbce_rag.retrieval import Selection, select  # the old module nbce_rag.retrieval's names
    from nbce_rag.retrieval.selection import Selection as S2, select as s2

    assert (Selection, select) == (S2, s2)
    from nbce_rag.data import qrels_to_pairs, read_qrels  # noqa: F401 - an older path still


def _readme_imports() -> List[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    lines = []
    for block in re.findall(r"```python\n(.*?)```", text, flags=re.S):
        for line in textwrap.dedent(block).splitlines():
            if re.match(r"(from nbce_rag[\w.]* import .+|import nbce_rag[\w.]*)$", line.strip()):
                lines.append(line.strip())
    return lines


def test_readme_snippets_import():
    lines = _readme_imports()
    assert len(lines) >= 5, lines
    code = "\n".join(lines) + "\nprint('ok')\n"
    r = subprocess.run([sys.executable, "-W", "always::DeprecationWarning", "-c", code],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
    assert "moved to" not in r.stderr, "the README shows an old import path: " + r.stderr[-2000:]
