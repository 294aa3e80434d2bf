"""Small real image indexes for the web tests: synth images embedded by the tiny random-init model, no Spark."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
from PIL import Image

from lakelens import index as ix
from lakelens import path_id
from lakelens.train import synth

# file names with markup in them: the page must show them as text and never run or insert them
# ("/" cannot be in a file name, so the closing tag is split across a folder and a file name)
HOSTILE = ["x<img src=x onerror=window.__xss=1>.png", "<script>window.__xss=2</script>.png"]
# a tag and a caption with markup in them (on the first hostile-named image, in indexes with keywords)
HOSTILE_TAG = "<img src=x onerror=window.__xss=3>"
HOSTILE_CAPTION = "<script>window.__xss=4</script> a caption with markup"
EXTRA = [(HOSTILE[0], 96), (HOSTILE[1], 96), ("big.png", 600)]  # drawn after the synth images, seeds 1000 + j
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
    for j, (name, side) in enumerate(EXTRA):
        p = img / name
        p.parent.mkdir(parents=True, exist_ok=True)
        synth.render(synth.samples(1, seed=1000 + j)[0], side, seed=99_000 + j).save(p)
        paths.append(str(p))
    return paths


def captions(paths: list[str]) -> dict[str, str]:
    """path -> the caption of the synth sample it was drawn from (make_images' images)."""
    out = {}
    for folder in {Path(p).parent for p in paths}:
        table = folder.parent / f"{folder.name}.captions.csv"
        if table.is_file():
            out.update(zip(*pd.read_csv(table)[["path", "caption"]].T.values))
    for j, (name, _) in enumerate(EXTRA):
        for p in paths:
            if p.endswith("/" + name):  # HOSTILE[1] holds a "/": its name spans a folder
                out[p] = synth.samples(1, seed=1000 + j)[0].caption
    return out


def keyword_docs(paths: list[str], uris: list[str], ids) -> list[tuple]:
    """The keyword index's documents (id, path, tags, captions): each image tagged with its caption's size,
    colour and shape words, with scores that differ between images; its caption as its caption."""
    from lakelens.index.keyword import TagRow

    caption_of, docs = captions(paths), []
    for i, (p, u, id_) in enumerate(zip(paths, uris, ids)):
        caption = caption_of[p]
        size, color, shape = caption.split()[1:4]  # "a large red circle on the left of a grey background"
        tags = [TagRow(shape, round(0.95 - 0.05 * (i % 6), 4), "zero-shot"),
                TagRow(color, round(0.85 - 0.04 * (i % 7), 4), "zero-shot"),
                TagRow(size, round(0.55 - 0.03 * (i % 5), 4), "caption")]
        if p.endswith("/" + HOSTILE[0]):
            tags.append(TagRow(HOSTILE_TAG, 0.5, "manual"))
            caption = HOSTILE_CAPTION
        docs.append((int(id_), u, tags, [(caption, 0.9)]))
    return docs


def publish(index_dir: Path, paths: list[str], plain: set[str] = frozenset(), keywords: bool = False) -> SimpleNamespace:
    """Embed the files and publish them as the next index version (2 exact shards), with the images' sizes.
    Paths in `plain` are stored as plain paths, the rest as file: URIs, as the embed job writes them.
    `keywords`: with a keyword index of tags and captions (keyword_docs; kept as `docs`)."""
    vecs = np.stack([r.embedding for r in embedder()([Path(p).read_bytes() for p in paths])])
    uris = [p if p in plain else f"file:{p}" for p in paths]
    ids = np.array([path_id(u) for u in uris], dtype=np.int64)
    sizes = list(zip(*(Image.open(p).size for p in paths)))
    docs = keyword_docs(paths, uris, ids) if keywords else None
    version = ix.build_local(index_dir, ids, vecs, uris, ix.Choice("Flat", "test", False), shards=2,
                             model_key=MODEL_KEY, sizes=sizes, keywords=docs)
    return SimpleNamespace(index=index_dir, version=version, paths=paths, uris=uris, ids=ids, vectors=vecs, docs=docs,
                           by_name={Path(p).name: (int(i), u) for p, i, u in zip(paths, ids, uris)})


def build(root: Path, n: int = 40, keywords: bool = False) -> SimpleNamespace:
    paths = make_images(root, n)
    return publish(root / "index", paths, plain={paths[1]}, keywords=keywords)


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
        # closed by the server's own loop (a thunk its trigger runs): sockets closed from this thread could
        # leave that loop in select() on a closed descriptor, an error in its thread. Every socket of its
        # map, the clients' kept-alive connections too: the loop runs until none is left (else join waited
        # out its 5 s after each test).
        from waitress import wasyncore

        self.server.trigger.pull_trigger(lambda: wasyncore.close_all(self.server._map))
        self.thread.join(timeout=5)
        self.server.task_dispatcher.shutdown(timeout=5)


CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"  # Debian's; setup.sh installs them


def headless_chromium(width: int, height: int, *flags: str):
    """Debian's Chromium, headless, through selenium and Debian's chromedriver (nothing downloaded); without
    background networking, whose connections the closed network refuses many at a time."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 f"--window-size={width},{height}", *flags):
        options.add_argument(flag)
    options.binary_location = CHROMIUM
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


@contextmanager
def serve_command(index: Path, log: Path, *flags: str, env: dict | None = None):
    """The real `lakelens serve` command on a free port it picks itself: yields (its base URL, the process,
    the line it announced itself with); stopped after. Its stderr goes to `log`."""
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "lakelens.cli", "serve", "--index", str(index), "--port", "0",
                                 "--threads", "4", *flags], cwd=Path(__file__).resolve().parents[1],
                                stdout=subprocess.PIPE, stderr=err, text=True, env=env or os.environ)
        try:
            line = proc.stdout.readline()
            match = re.search(r"on (http://127\.0\.0\.1:\d+)/", line)
            assert match, f"server did not start: {line!r}\n{log.read_text()}"
            yield match.group(1), proc, line
        finally:
            proc.terminate()
            proc.wait()
