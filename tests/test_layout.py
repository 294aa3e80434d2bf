"""The package's shape: the query path never imports pyspark, every module imports on its own (no
import circles), and the public API names what users need."""

from __future__ import annotations

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
