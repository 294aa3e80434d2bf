"""The package as a user gets it: the wheel built from this checkout, `pip install`ed with its declared
dependencies (no extras) into a venv, runs embed -> tag -> index (one `lakelens refresh`) and search from a
folder outside the checkout, with the built-in vocabulary and the defaults that ship inside the wheel.

The dependencies come from a wheelhouse, not from the network at install time: `pip wheel` fills it once per
set of declared dependencies and pins (about 3.4 GB, torch's CUDA build with its nvidia packages; a few
minutes), in $LAKELENS_WHEELHOUSE or ~/.cache/lakelens/wheelhouse, so that each run does not fetch it again.
pip still resolves the wheel's own Requires-Dist against it (--no-index, requirements.txt's pins as
constraints): a dependency the wheel forgets to declare is not installed, and the commands fail.
`--no-compile` skips byte-compiling torch's files, the bulk of an install's time here.

The venv is kept too, beside the wheelhouse it was filled from: made once per set of declared dependencies,
pins and interpreter, it holds those dependencies and nothing else (about 6 GB; installing them takes about a
minute). Each run installs the wheel into it afresh, pip again resolving the wheel's declared dependencies
against what is there, and uninstalls it afterwards; a lock beside it makes a second test run on the machine
wait for the first."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import ROOT, write_images

from lakelens.spark import jars_folder
from lakelens.tags.vocab import load_vocab

# what a source distribution of lakelens holds: the files the wheel is built from
SOURCES = ("pyproject.toml", "README.md", "lib")
CONF = """spark:
  master: local[2]
  shuffle_partitions: 2
  extra:
    spark.ui.enabled: "false"
    spark.driver.host: 127.0.0.1
    spark.driver.bindAddress: 127.0.0.1
    spark.driver.extraJavaOptions: -XX:TieredStopAtLevel=1
"""


def build_wheel(out: Path) -> Path:
    """The wheel of this checkout's sources, built from a clean copy (no stale build/ or egg-info)."""
    src = out / "src"
    src.mkdir(parents=True)
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(ROOT / name, src / name)
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out / "dist"),
         str(src)], timeout=300)
    (wheel,) = (out / "dist").glob("lakelens-*.whl")
    return wheel


def constraints(out: Path) -> Path:
    """requirements.txt (the tested pins) as a pip constraints file: constraints cannot name extras."""
    lines = [re.sub(r"\[[^]]*\]", "", line.split("#")[0]).strip() for line in (ROOT / "requirements.txt").open()]
    path = out / "constraints.txt"
    path.write_text("".join(f"{line}\n" for line in lines if line))
    return path


def wheel_metadata(wheel: Path) -> str:
    with zipfile.ZipFile(wheel) as z:
        return z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()


def wheelhouse(wheel: Path, pins: Path) -> Path:
    """Wheels of every dependency the wheel declares, resolved under the pins; built once per (declared
    dependencies, pins), kept between runs, older ones removed."""
    declared = sorted(line for line in wheel_metadata(wheel).splitlines() if line.startswith("Requires-Dist:"))
    key = hashlib.sha256(("\n".join(declared) + pins.read_text()).encode()).hexdigest()[:16]
    root = Path(os.environ.get("LAKELENS_WHEELHOUSE") or Path.home() / ".cache" / "lakelens" / "wheelhouse")
    house = root / key
    if not (house / "complete").is_file():
        part = root / f".{key}.{os.getpid()}"
        shutil.rmtree(part, ignore_errors=True)
        # the one step that reaches the package index (pyspark comes as an sdist and is built into a wheel);
        # the wheels of an earlier set are taken from there instead of being fetched again
        earlier = [f"--find-links={old}" for old in root.glob("*") if (old / "complete").is_file()]
        run([sys.executable, "-m", "pip", "wheel", "-q", *earlier, "-w", part, "-c", pins, wheel], timeout=1800)
        (part / wheel.name).unlink()
        (part / "complete").write_text("\n".join(declared) + "\n")
        for old in root.iterdir():
            if old.name != key and not old.name.startswith("."):
                shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(house, ignore_errors=True)
        os.replace(part, house)
    return house


def run(cmd: list, timeout: float, **kw) -> subprocess.CompletedProcess:
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)
    assert res.returncode == 0, f"{' '.join(map(str, cmd))}\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}"
    return res


def pip_install(py: Path, house: Path, pins: Path, wheel: Path) -> None:
    """`wheel` and the dependencies it declares, from the wheelhouse alone, under the pins."""
    run([py, "-m", "pip", "install", "-q", "--no-compile", "--no-index", "--find-links", house, "-c", pins, wheel],
        timeout=1800)


def uninstall_lakelens(py: Path) -> None:
    """lakelens out of the kept venv (nothing to do when it is not there)."""
    subprocess.run([str(py), "-m", "pip", "uninstall", "-y", "-q", "lakelens"], capture_output=True, timeout=300)


def deps_venv(house: Path, pins: Path, wheel: Path) -> Path:
    """A venv holding the dependencies `wheel` declares (resolved under `pins` from `house`) and nothing else;
    made once per wheelhouse and interpreter (a venv cannot move: it is made where it stays), `complete`
    marks it whole. Returned without lakelens in it."""
    tag = hashlib.sha256(f"{sys.version}\n{os.path.realpath(sys.executable)}".encode()).hexdigest()[:12]
    folder = house / f"venv-{tag}"
    py = folder / "bin" / "python"
    if not (folder / "complete").is_file():
        shutil.rmtree(folder, ignore_errors=True)
        run([sys.executable, "-m", "venv", folder], timeout=300)
        pip_install(py, house, pins, wheel)
        (folder / "complete").write_text(f"{sys.version}\n")
    # a run stopped before its clean-up leaves lakelens behind: this run installs its own wheel
    uninstall_lakelens(py)
    return folder


def test_the_wheel_installs_with_its_dependencies_and_runs_embed_index_search_and_tag(tmp_path):
    jars = jars_folder()
    if jars is None:
        pytest.fail("no Delta jars (make setup fetches them into build/jars)")
    wheel = build_wheel(tmp_path / "build")
    version = re.search(r"^Version: (.+)$", wheel_metadata(wheel), re.M).group(1)
    assert wheel.name == f"lakelens-{version}-py3-none-any.whl"
    pins = constraints(tmp_path / "build")
    house = wheelhouse(wheel, pins)
    with open(house / "venv.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one run at a time in the kept venv: a second test run here waits
        venv = deps_venv(house, pins, wheel)
        try:
            installed_and_run(tmp_path, venv, house, pins, wheel, version, jars)
        finally:
            uninstall_lakelens(venv / "bin" / "python")


def installed_and_run(tmp_path: Path, venv: Path, house: Path, pins: Path, wheel: Path, version: str, jars: str):
    py, lakelens = venv / "bin" / "python", venv / "bin" / "lakelens"
    assert not lakelens.exists()
    pip_install(py, house, pins, wheel)
    installed = {re.sub(r"[-_.]+", "-", line.split("==")[0]).lower()
                 for line in run([py, "-m", "pip", "list", "--format=freeze"], timeout=120).stdout.split()}
    assert {"lakelens", "torch", "pyspark", "delta-spark", "onnxruntime"} <= installed
    assert not {"dash", "transformers", "grpcio", "pytest"} & installed  # the extras' parts stay out

    # a user's folder: no checkout above it, no PYTHONPATH; the jars from $LAKELENS_JARS_DIR as a cluster's
    # image would set it (elsewhere spark.jars.packages: `lakelens jars` below)
    work = tmp_path / "work"
    work.mkdir()
    drop = ("PYTHONPATH", "SPARK_SUBMIT_OPTS", "PYSPARK_PYTHON", "PYSPARK_DRIVER_PYTHON", "SPARK_HOME", "VIRTUAL_ENV",
            "LAKELENS_JARS_DIR", "LAKELENS_CDS")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}", LAKELENS_CACHE_DIR=str(tmp_path / "cache"),
               LAKELENS_LOCK_DIR=str(tmp_path / "locks"), XDG_CACHE_HOME=str(tmp_path / "xdg"))

    def cli(*args, jars_dir: str | None = jars, timeout: float = 600) -> str:
        extra = {"LAKELENS_JARS_DIR": jars_dir} if jars_dir else {}
        return run([lakelens, *args], timeout=timeout, cwd=work, env={**env, **extra}).stdout

    probe = run([py, "-c", "import importlib.metadata as m, lakelens, lakelens.spark as s; "
                 "print(lakelens.__file__, lakelens.__version__, m.version('lakelens'), s.checkout_root())"],
                timeout=300, cwd=work, env=env).stdout.split()
    assert Path(probe[0]).is_relative_to(venv) and not Path(probe[0]).is_relative_to(ROOT)
    assert probe[1:] == [version, version, "None"]
    assert cli("config", "--defaults").startswith("# Every config key")  # package data
    assert cli("jars").split() == ["--jars", ",".join(sorted(str(j) for j in Path(jars).glob("*.jar")))]
    assert cli("jars", jars_dir=None).split()[0] == "--packages"  # no jars anywhere: Maven coordinates

    images = write_images(work / "images", 6)
    (work / "conf.yaml").write_text(CONF)
    common = ["--conf", "conf.yaml"]
    # embed -> tag -> index as a scheduled refresh runs them: every job from the wheel, in one JVM
    line = json.loads(cli("refresh", "--images", "images", "--table", "emb", "--index", "idx", "--tags", "tags",
                          "--vocab", "shapes", "--model", "lakelens-tiny", "--pretrained", "none",
                          "--set", "tag.threshold=-1", "--set", "tag.max_tags=2", *common).splitlines()[-1])
    embedded, tagged, indexed = line["embed"], line["tag"], line["index"]
    assert embedded["embedded"] == 6 and embedded["failed"] == 0
    assert (tagged["scored"], tagged["tag_rows"], tagged["tags"]) == (6, 12, 15)
    assert indexed["built"] and indexed["rows"] == 6
    found = json.loads(cli("search", "--index", "idx", "a large red circle", "-k", "3", "--mode", "hybrid", "--json"))
    shapes = set(load_vocab("shapes").tags)
    names = {p.name for p in images}
    assert found["results"] and all(Path(r["path"]).name in names for r in found["results"])
    assert all(r["tags"] and set(r["tags"]) <= shapes for r in found["results"])
