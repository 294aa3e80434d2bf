"""The package's shape: the query path never imports pyspark, every module imports on its own, imports
point down the declared layers with no circles (imports inside functions too) and take no private name
from another package, and the public API names what users need."""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import lakelens

QUERY_PATH = """
import sys
import numpy as np
from lakelens import Choice, Searcher, build_local
from lakelens.web import create_app
index = sys.argv[1]
rng = np.random.default_rng(0)
x = rng.normal(size=(50, 128)).astype(np.float32)
x /= np.linalg.norm(x, axis=1, keepdims=True)
build_local(index, np.arange(50), x, [f"file:/img/{i}.png" for i in range(50)], Choice("Flat", "t", False),
            model_key="lakelens-tiny@none")
s = Searcher.open(index, engine="torch")
assert s.search_vector(x[3], k=1)["id"][0] == 3
assert len(s.search_text("a red circle", k=5)) == 5
create_app(index)
print("pyspark" in sys.modules, sorted(m for m in sys.modules if m.startswith("pyspark"))[:3])
"""


def test_opening_a_searcher_and_querying_never_imports_pyspark(tmp_path):
    out = subprocess.run([sys.executable, "-c", QUERY_PATH, str(tmp_path / "index")], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False []"


# One interpreter imports the third-party modules that lakelens's modules import at their top level (torch,
# pandas, pyspark, ...: seconds), never lakelens itself, then forks one child per lakelens module, which
# imports that module alone: a circle shows up as an ImportError of a partly initialised module, as in a
# fresh interpreter, without paying the third-party imports 70 times over. A third-party import that fails
# here is left to the child, which then fails as a fresh interpreter would.
IMPORT_EACH = """
import ast, importlib, json, os, sys, traceback
from pathlib import Path

root = Path(sys.argv[1])
third = set()
for path in root.rglob("*.py"):
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            third.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            third.add(node.module)
for name in sorted(m for m in third if m.split(".")[0] != "lakelens"):
    try:
        importlib.import_module(name)
    except Exception:
        pass
assert not [m for m in sys.modules if m.split(".")[0] == "lakelens"]
failures, running = [], {}


def reap():
    pid, status = os.wait()
    name, pipe = running.pop(pid)
    with os.fdopen(pipe) as out:
        message = out.read()
    if status:
        failures.append(f"{name}: {message or status}")


for name in sys.argv[2:]:
    if len(running) >= (os.cpu_count() or 2):
        reap()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            importlib.import_module(name)
        except BaseException as e:
            os.write(w, traceback.format_exception_only(e)[-1].strip().encode())
            os._exit(1)
        os._exit(0)
    os.close(w)
    running[pid] = (name, r)
while running:
    reap()
print(json.dumps(failures))
"""


def test_every_module_imports_on_its_own():
    root = Path(lakelens.__file__).parent
    names = sorted(m.name for m in pkgutil.walk_packages([str(root)], prefix="lakelens."))
    assert {"lakelens.ingest.embed_job", "lakelens.index.job", "lakelens.search.searcher", "lakelens.web.app"} <= set(names)
    run = subprocess.run([sys.executable, "-c", IMPORT_EACH, str(root), *names], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    failures = json.loads(run.stdout.strip().splitlines()[-1])
    assert failures == []


def test_public_api_names_resolve():
    for name in lakelens.__all__:
        assert getattr(lakelens, name) is not None
    assert issubclass(lakelens.QueryError, lakelens.LakelensError)
    assert issubclass(lakelens.BusyError, lakelens.LakelensError)


# The declared layers, lowest first (DESIGN.md "Layout", docs/architecture.md): a module may import its
# own layer and the layers below it, never one above. Names are taken by their longest match, so
# `ingest.paths` sits below `models` while the rest of `ingest` sits above it (the embedder runs a model).
LAYERS = [
    ("errors", "files"),  # the error kinds; atomic writes and sorted Arrow files
    ("config",),
    ("jars", "jvm", "classic", "spark", "delta_sql", "locks", "connect_server"),  # sessions and Delta
    ("ingest.paths", "ingest.images", "ingest.storage", "ingest.globs", "ingest.regions", "ingest.small_tables"),
    ("models",),
    ("ingest",),  # the embedder, listing, the embeddings table and its change feed, the embed job
    ("index", "tags.vocab"),  # vocabularies: read by the keyword index and the tag job alike
    ("search",),
    ("tags", "dedup", "train", "web"),
    ("refresh", "demo", "cli", ""),  # "": the package itself (its public API loads names on first use)
]
# Packages of one layer that stand side by side: none imports another.
PEERS = {"tags", "dedup", "train", "web"}


def _modules() -> dict[str, tuple[Path, bool]]:
    """Every lakelens module: its file and whether it is a package."""
    root = Path(lakelens.__file__).parent
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if package else parts)] = (path, package)
    return out


def _imports(name: str, path: Path, package: bool, modules) -> list[tuple[str, str | None, int]]:
    """(module imported, the name taken from it or None, line) for every import of a lakelens module in this
    file: at module level, inside functions and classes alike."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                here = name.split(".") if package else name.split(".")[:-1]
                base = ".".join(here[:len(here) - node.level + 1] + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.append((sub, None, node.lineno) if sub in modules else (base, a.name, node.lineno))
    return [i for i in out if i[0] == "lakelens" or i[0].startswith("lakelens.")]


def _graph() -> dict[str, set[str]]:
    """lakelens module -> the lakelens modules that importing it runs: those it names, and the packages
    above them that it is not inside itself (their __init__ runs first)."""
    modules = _modules()
    graph = {}
    for name, (path, package) in modules.items():
        edges = set()
        for target, _, _ in _imports(name, path, package, modules):
            parts = target.split(".")
            for i in range(2, len(parts) + 1):
                above = ".".join(parts[:i])
                if above == target or (above in modules and not name.startswith(above + ".")):
                    edges.add(above)
        edges.discard(name)
        graph[name] = edges
    return graph


def _layer(module: str) -> int:
    rel = module[len("lakelens."):] if module.startswith("lakelens.") else ""
    best = max(((len(n), i) for i, names in enumerate(LAYERS) for n in names
                if rel == n or (n and rel.startswith(n + "."))), default=None)
    assert best is not None, f"{module}: in no layer of LAYERS (add it where DESIGN.md's Layout puts it)"
    return best[1]


def _package(module: str) -> str:
    return (module.split(".") + [""])[1]


def test_every_module_has_a_layer():
    for name in _modules():
        _layer(name)


def test_no_import_circles_counting_imports_inside_functions():
    graph = _graph()
    circles, done, stack = [], set(), []

    def visit(node: str, on_path: dict[str, int]) -> None:
        on_path[node] = len(stack)
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt in on_path:
                circles.append(" -> ".join(stack[on_path[nxt]:] + [nxt]))
            elif nxt not in done:
                visit(nxt, on_path)
        stack.pop()
        del on_path[node]
        done.add(node)

    for start in sorted(graph):
        if start not in done:
            visit(start, {})
    assert circles == [], "\n".join(circles)


def test_imports_point_down_the_layers():
    modules = _modules()
    upward = []
    for name, (path, package) in modules.items():
        for target, _, line in _imports(name, path, package, modules):
            if _layer(target) > _layer(name):
                upward.append(f"{name}:{line} imports {target} (a layer above it)")
            elif _package(name) in PEERS and _package(target) in PEERS and _package(name) != _package(target):
                upward.append(f"{name}:{line} imports {target} (a package beside it)")
    assert upward == [], "\n".join(upward)


def test_no_private_names_taken_across_packages():
    modules = _modules()
    taken = []
    for name, (path, package) in modules.items():
        for target, attr, line in _imports(name, path, package, modules):
            if attr is not None and attr.startswith("_") and _package(target) != _package(name):
                taken.append(f"{name}:{line} imports {target}.{attr}")
        aliases = {}  # a name bound to another package's module: `from lakelens.x import y`, `import lakelens.x as y`
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                bound = {a.asname or a.name: f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                bound = {a.asname: a.name for a in node.names if a.asname}
            else:
                continue
            aliases.update({k: v for k, v in bound.items() if v in modules and _package(v) != _package(name)})
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                taken.append(f"{name}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
    assert taken == [], "\n".join(taken)
