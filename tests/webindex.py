"""Small real image indexes for the web tests: synth images embedded by the tiny random-init model, no Spark."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd

from lakelens import index as ix
from lakelens import path_id
from lakelens.train import synth

# file names with markup in them: the page must show them as text and never run or insert them
# ("/" cannot be in a file name, so the closing tag is split across a folder and a file name)
HOSTILE = ["x<img src=x onerror=window.__xss=1>.png", "<script>window.__xss=2</script>.png"]
MODEL_KEY = "lakelens-tiny@none"

_embedder = None


def embedder():
    global _embedder
    if _embedder is None:
        from lakelens import Embedder, ModelSpec

        _embedder = Embedder(ModelSpec("lakelens-tiny"))
    return _embedder


def make_images(root: Path, n: int = 40, seed: int = 11) -> list[str]:
    """n captioned synth images, the two hostile names and one 600 px image (thumbnails shrink it).
    Every image is drawn with its own seed: no two have the same pixels, so an image's own vector is
    its unique top match."""
    img = root / "img"
    paths = list(pd.read_csv(synth.write_dataset(img, n, seed=seed))["path"])
    extra = [img / HOSTILE[0], img / HOSTILE[1], img / "big.png"]
    for j, p in enumerate(extra):
        p.parent.mkdir(parents=True, exist_ok=True)
        synth.render(synth.samples(1, seed=1000 + j)[0], 600 if p.name == "big.png" else 96, seed=99_000 + j).save(p)
        paths.append(str(p))
    return paths


def publish(index_dir: Path, paths: list[str], plain: set[str] = frozenset()) -> SimpleNamespace:
    """Embed the files and publish them as the next index version (2 exact shards). Paths in `plain`
    are stored as plain paths, the rest as file: URIs, as the embed job writes them."""
    vecs = np.stack([r.embedding for r in embedder()([Path(p).read_bytes() for p in paths])])
    uris = [p if p in plain else f"file:{p}" for p in paths]
    ids = np.array([path_id(u) for u in uris], dtype=np.int64)
    version = ix.build_local(index_dir, ids, vecs, uris, ix.Choice("Flat", "test", False), shards=2,
                             model_key=MODEL_KEY)
    return SimpleNamespace(index=index_dir, version=version, paths=paths, uris=uris, ids=ids, vectors=vecs,
                           by_name={Path(p).name: (int(i), u) for p, i, u in zip(paths, ids, uris)})


def build(root: Path, n: int = 40) -> SimpleNamespace:
    paths = make_images(root, n)
    return publish(root / "index", paths, plain={paths[1]})


class ThreadServer:
    """The real app under waitress on a free loopback port, in a daemon thread of the test process."""

    def __init__(self, index_dir: Path, **limits):
        from lakelens.web import Limits, create_app, make_server

        self.app = create_app(index_dir, Limits(**limits))
        self.server = make_server(self.app, "127.0.0.1", 0, threads=4)
        self.base = f"http://127.0.0.1:{self.server.effective_port}"
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()

    def close(self):
        self.server.close()
        self.server.task_dispatcher.shutdown(timeout=5)
