"""The import rules of docs/architecture.md, read from the code with ``ast``.

Two rules hold for every module of the repository:

* no circle: no module imports, directly or through others, a module that
  imports it back (imports under ``if TYPE_CHECKING:`` and inside functions
  count: a circle means neither file can be read or tested alone);
* layers: a module imports only from the layers its package may use
  (:data:`ALLOWED`), never from one above it.

Both are checked on the real tree, and each is shown to fail on a tree with
a planted circle or an upward import.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Optional, Set, Tuple

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("svckit", "gradesvc", "lbsvc", "txrabbitstream", "harness", "bench", "tests")

# Which parts of the repository each part may import (besides itself).  A part
# is a top-level package or one of the daemons' sub-packages; a daemon's
# top-level modules (tap, build, config, testing, ...) are its wiring, which
# may import any of its own parts.
ALLOWED: Mapping[str, Set[str]] = {
    # The ground floor: stands on nothing of ours.
    "svckit": set(),
    # The stream-protocol client: importable without any of the project.
    "txrabbitstream": set(),
    # gradesvc, bottom up: state < stream < (api, status) < wiring.
    "gradesvc.state": {"svckit"},
    "gradesvc.stream": {"svckit", "txrabbitstream", "gradesvc.state"},
    "gradesvc.api": {"svckit", "gradesvc.state", "gradesvc.stream"},
    "gradesvc.status": {"svckit", "gradesvc.state"},
    "gradesvc": {"svckit", "txrabbitstream", "gradesvc.state", "gradesvc.stream", "gradesvc.api",
                 "gradesvc.status"},
    # lbsvc: backends stand alone; users and limits below proxying; wiring on top.
    "lbsvc.backends": {"svckit"},
    "lbsvc.users": {"svckit", "lbsvc.users.api->lbsvc.limits"},
    "lbsvc.limits": {"svckit", "lbsvc.users"},
    "lbsvc.proxying": {"svckit", "lbsvc.backends", "lbsvc.limits", "lbsvc.users"},
    "lbsvc": {"svckit", "lbsvc.backends", "lbsvc.users", "lbsvc.limits", "lbsvc.proxying"},
    # Around the product (a whole daemon named here means all of its parts): processes for tests
    # and benchmarks, the benchmarks, the tests.
    "harness": {"svckit", "txrabbitstream", "gradesvc", "lbsvc"},
    "bench": {"svckit", "gradesvc", "lbsvc", "txrabbitstream", "harness"},
    "tests": {"svckit", "gradesvc", "lbsvc", "txrabbitstream", "harness"},
}
"""Besides whole parts, an entry ``"a.b.module->a.c"`` lets that one module import part ``a.c``:
``lbsvc.users.api`` shows a user's bucket, so it (and no other users module) uses ``lbsvc.limits``."""


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(root: Path, packages: Tuple[str, ...] = PACKAGES) -> Dict[str, Path]:
    """Every module of ``packages`` under ``root``, by dotted name."""
    found: Dict[str, Path] = {}
    for package in packages:
        base = root / package
        if base.is_dir():
            for path in sorted(base.rglob("*.py")):
                found[module_name(root, path)] = path
    return found


def imports_of(name: str, path: Path, known: Mapping[str, Path]) -> Set[str]:
    """The modules of ``known`` that module ``name`` imports, wherever in the file."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found: Set[str] = set()

    def add(target: str) -> None:
        while target and target not in known:  # a name imported from a module: the module
            target = target.rpartition(".")[0]
        if target and target != name:
            found.add(target)

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                add(f"{base}.{alias.name}")
    return found


def graph(root: Path, packages: Tuple[str, ...] = PACKAGES) -> Dict[str, Set[str]]:
    known = modules(root, packages)
    return {name: imports_of(name, path, known) for name, path in known.items()}


def circles(edges: Mapping[str, Set[str]]) -> List[List[str]]:
    """Every group of modules that import each other (Tarjan's strongly connected components)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []

    def visit(start: str) -> None:
        work: List[Tuple[str, Iterator[str]]] = [(start, iter(sorted(edges.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1:
                    found.append(sorted(group))

    for name in sorted(edges):
        if name not in index:
            visit(name)
    return found


def part_of(module: str, allowed: Mapping[str, Set[str]] = ALLOWED) -> Optional[str]:
    """The most specific part of :data:`ALLOWED` that ``module`` belongs to."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in allowed and (n < len(parts) or candidate == module):
            return candidate
    return None


def upward(edges: Mapping[str, Set[str]], allowed: Mapping[str, Set[str]] = ALLOWED) -> List[str]:
    """Every import that crosses into a part its importer may not use."""
    wrong = []
    for module, targets in sorted(edges.items()):
        mine = part_of(module, allowed)
        if mine is None:
            continue
        may = allowed[mine]
        for target in sorted(targets):
            theirs = part_of(target, allowed)
            if theirs is None or theirs == mine or any(theirs == m or theirs.startswith(m + ".") for m in may):
                continue
            if any(rule == f"{m}->{theirs}" for rule in may for m in _prefixes(module)):
                continue
            wrong.append(f"{module} ({mine}) imports {target} ({theirs}); {mine} may use only "
                         f"{', '.join(sorted(r for r in may if '->' not in r)) or 'nothing of ours'}")
    return wrong


def _prefixes(module: str) -> Iterator[str]:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        yield ".".join(parts[:n])


def test_no_module_imports_one_that_imports_it_back() -> None:
    found = circles(graph(ROOT))
    assert not found, "import circles (each group imports itself through the others): " + "; ".join(
        " <-> ".join(group) for group in found)


def test_every_import_points_down_the_layers() -> None:
    wrong = upward(graph(ROOT))
    assert not wrong, "imports against docs/architecture.md's layers:\n" + "\n".join(wrong)


def test_every_part_of_the_products_has_a_rule() -> None:
    known = modules(ROOT, ("svckit", "gradesvc", "lbsvc", "txrabbitstream"))
    assert known
    assert [name for name in known if part_of(name) is None] == []


def plant(root: Path, files: Mapping[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_a_planted_circle_is_found_also_through_type_checking_imports(tmp_path: Path) -> None:
    root = plant(tmp_path, {
        "gradesvc/__init__.py": "",
        "gradesvc/stream/__init__.py": "",
        "gradesvc/stream/a.py": "from gradesvc.stream.b import thing\n",
        "gradesvc/stream/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import c\n",
        "gradesvc/stream/c.py": "def late():\n    import gradesvc.stream.a\n",
        "gradesvc/stream/d.py": "from gradesvc.stream import a\n",
    })
    assert circles(graph(root, ("gradesvc",))) == [["gradesvc.stream.a", "gradesvc.stream.b", "gradesvc.stream.c"]]


def test_a_planted_upward_import_is_named(tmp_path: Path) -> None:
    root = plant(tmp_path, {
        "gradesvc/__init__.py": "",
        "gradesvc/build.py": "from gradesvc.state.store import GradeStore\n",
        "gradesvc/state/__init__.py": "",
        "gradesvc/state/store.py": "from gradesvc.stream.messages import FIELDS\n",
        "gradesvc/stream/__init__.py": "",
        "gradesvc/stream/messages.py": "from gradesvc.state import store\n",
        "gradesvc/api/__init__.py": "",
        "gradesvc/api/read.py": "from gradesvc.status.overview import page\nfrom gradesvc.stream import messages\n",
        "gradesvc/status/__init__.py": "",
        "gradesvc/status/overview.py": "from gradesvc import build\n",
    })
    assert upward(graph(root, ("gradesvc",))) == [
        ("gradesvc.api.read (gradesvc.api) imports gradesvc.status.overview (gradesvc.status); gradesvc.api may use"
        " only gradesvc.state, gradesvc.stream, svckit"),
        ("gradesvc.state.store (gradesvc.state) imports gradesvc.stream.messages (gradesvc.stream); gradesvc.state"
        " may use only svckit"),
        ("gradesvc.status.overview (gradesvc.status) imports gradesvc.build (gradesvc); gradesvc.status may use only"
        " gradesvc.state, svckit"),
    ]


def test_a_one_module_exception_covers_that_module_only(tmp_path: Path) -> None:
    root = plant(tmp_path, {
        "lbsvc/__init__.py": "",
        "lbsvc/limits/__init__.py": "",
        "lbsvc/limits/buckets.py": "",
        "lbsvc/users/__init__.py": "",
        "lbsvc/users/api.py": "from lbsvc.limits.buckets import IBucketStore\n",
        "lbsvc/users/store.py": "from lbsvc.limits import buckets\n",
    })
    assert upward(graph(root, ("lbsvc",))) == [
        "lbsvc.users.store (lbsvc.users) imports lbsvc.limits.buckets (lbsvc.limits); lbsvc.users may use only svckit",
    ]
