"""The package's shape: the query path never imports pyspark, every module imports on its own (no
import circles), and the public API names what users need."""

from __future__ import annotations

import os
import pkgutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
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


def test_every_module_imports_on_its_own():
    root = Path(lakelens.__file__).parent
    names = sorted(m.name for m in pkgutil.walk_packages([str(root)], prefix="lakelens."))
    assert {"lakelens.ingest.embed_job", "lakelens.index.job", "lakelens.search.searcher", "lakelens.web.app"} <= set(names)
    # one fresh interpreter per module: a circle shows up as an ImportError of a partly initialised module
    script = "import importlib, sys\nfor n in sys.argv[1:]:\n    importlib.import_module(n)\n"

    def check(name: str) -> str | None:
        run = subprocess.run([sys.executable, "-c", script, name], capture_output=True, text=True, timeout=300)
        return f"{name}: {run.stderr.strip().splitlines()[-1]}" if run.returncode else None

    with ThreadPoolExecutor(os.cpu_count() or 2) as pool:  # the interpreters are separate processes
        failures = [f for f in pool.map(check, names) if f]
    assert failures == []


def test_public_api_names_resolve():
    for name in lakelens.__all__:
        assert getattr(lakelens, name) is not None
    assert issubclass(lakelens.QueryError, lakelens.LakelensError)
    assert issubclass(lakelens.BusyError, lakelens.LakelensError)
