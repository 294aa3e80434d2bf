"""clip-retrieval's own clients for the tests: its released wheel, downloaded once (pip download, no
dependencies) into $LAKELENS_CLIPRET_CACHE or ~/.cache/lakelens/clip-retrieval and checked by digest;
ClipClient loaded from the wheel's module file (it needs only requests: the package itself pulls torch, flask
and old numpy pins); and the front end's static build from the same wheel."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import types
import zipfile
from pathlib import Path

VERSION = "2.45.0"
WHEEL = f"clip_retrieval-{VERSION}-py3-none-any.whl"
SHA256 = "07f52947727b75fa0b22f0f938f352c90ea0f4fa3d4c0b2e3d284a42c1a497e4"
FRONT = "front/build/"


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def wheel() -> Path:
    root = Path(os.environ.get("LAKELENS_CLIPRET_CACHE") or Path.home() / ".cache" / "lakelens" / "clip-retrieval")
    path = root / WHEEL
    if path.is_file() and digest(path) == SHA256:
        return path
    part = root / f".download.{os.getpid()}"
    shutil.rmtree(part, ignore_errors=True)
    part.mkdir(parents=True)
    res = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(part),
                          f"clip-retrieval=={VERSION}"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"pip download clip-retrieval=={VERSION} failed:\n{res.stderr[-3000:]}"
    got = part / WHEEL
    assert digest(got) == SHA256, f"{WHEEL} from the package index has another digest than the pinned one"
    os.replace(got, path)
    shutil.rmtree(part, ignore_errors=True)
    return path


def client_module(whl: Path) -> types.ModuleType:
    """clip_retrieval/clip_client.py from the wheel, as a module of its own (the package's __init__ imports
    the back end and its heavy dependencies)."""
    with zipfile.ZipFile(whl) as z:
        source = z.read("clip_retrieval/clip_client.py").decode()
    module = types.ModuleType("clip_client")
    module.__file__ = f"{whl}/clip_retrieval/clip_client.py"
    exec(compile(source, module.__file__, "exec"), module.__dict__)
    return module


def extract_front(whl: Path, dest: Path) -> Path:
    """The front end's static build (index.html, main.*.js, config.json, assets/) in `dest`."""
    with zipfile.ZipFile(whl) as z:
        for name in z.namelist():
            if name.startswith(FRONT) and not name.endswith("/"):
                target = dest / name[len(FRONT):]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(z.read(name))
    return dest
