"""clip-retrieval's own web front end (the static build in its wheel), served on loopback and opened in headless
Chromium against `lakelens serve`: it lists lakelens's index, its text, image and "search by this image" queries
show lakelens's images in the order and with the scores `lakelens search` gives, and scrolling loads the rest."""

from __future__ import annotations

import functools
import http.server
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import clipret
import pytest
import webindex
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.support.ui import WebDriverWait

ROOT = Path(__file__).resolve().parents[2]
WAIT = 60  # an upper bound for a wait-for-condition on 2 busy cores, not a speed check

# the front end's results live in its element's shadow root: each figure's image, its loaded state, and the
# similarity it prints when "Display similarities" is on
FIGURES = """
const root = document.querySelector('clip-front').shadowRoot;
return Array.from(root.querySelectorAll('#products figure')).map(f => {
  const img = f.querySelector('img.pic'), p = f.querySelector('p');
  return {src: img.src, loaded: img.complete && img.naturalWidth > 0, similarity: p ? p.textContent : null};
});"""
CHECKBOX = """
const root = document.querySelector('clip-front').shadowRoot;
Array.from(root.querySelectorAll('#filter label')).find(l => l.textContent.includes(arguments[0]))
  .querySelector('input').click();"""


class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("clipfront")
    data = webindex.build(root)
    # the front end's static files, from another origin (another port), as `clip-retrieval front` would serve them
    front = clipret.extract_front(clipret.wheel(), root / "front")
    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(front)))
    threading.Thread(target=files.serve_forever, daemon=True).start()
    try:
        with webindex.serve_command(data.index, root / "server.log", "--clip-name", "photos") as (base, proc, _):
            assert "indice_name photos" in proc.stdout.readline()
            data.base, data.front = base, f"http://127.0.0.1:{files.server_address[1]}"
            yield data
    finally:
        files.shutdown()


@pytest.fixture(scope="module")
def browser():
    driver = webindex.headless_chromium(1280, 600)
    yield driver
    driver.quit()


def lakelens_search(index: Path, *args) -> list[dict]:
    res = subprocess.run([sys.executable, "-m", "lakelens.cli", "search", "--index", str(index), "--json", *args],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, env=os.environ)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)["results"]


def shown(driver, what: str, test) -> list[dict]:
    """The figures once `test(figures)` holds and every image has loaded."""
    found = {}

    def ready(d):
        figures = d.execute_script(FIGURES)
        found["figures"] = figures
        return bool(figures) and test(figures) and all(f["loaded"] for f in figures)

    try:
        WebDriverWait(driver, WAIT, poll_frequency=0.1).until(ready)
    except TimeoutException:
        raise AssertionError(f"waiting for {what}, the page shows {found.get('figures')}") from None
    return found["figures"]


def image_id(src: str) -> int:
    return int(re.search(r"/thumb/(-?\d+)\?", src).group(1))


def test_the_front_end_searches_lakelens_and_shows_its_images(site, browser, tmp_path):
    d, n = browser, len(site.ids)
    d.get(f"{site.front}/?back={site.base}&index=photos&query=a red circle")
    # the first search runs with the front end's defaults (near-duplicates hidden: the tiny model puts many
    # images that close); showing them all and the similarities gives lakelens search's whole list
    shown(d, "the first results", lambda f: True)
    assert d.execute_script("return document.querySelector('clip-front').shadowRoot"
                            ".querySelector('#filter select option').value") == "photos"  # from /indices-list
    d.execute_script(CHECKBOX, "Hide (near) duplicate images")
    d.execute_script(CHECKBOX, "Display similarities")
    # the first answer's 40 (the front end may already be loading more below them: a short page has its end
    # in view at once)
    figures = shown(d, "40 results with similarities", lambda f: len(f) >= 40 and f[0]["similarity"])[:40]
    expected = lakelens_search(site.index, "a red circle", "-k", str(n))
    assert [image_id(f["src"]) for f in figures] == [int(r["id"]) for r in expected[:40]]
    assert all(f["src"].startswith(f"{site.base}/thumb/") for f in figures)  # lakelens's own images
    assert [float(f["similarity"]) for f in figures] == pytest.approx([r["score"] for r in expected[:40]], abs=1e-4)
    d.save_screenshot(str(tmp_path / "text.png"))

    # scrolling to the end asks /metadata for the rest of the results
    d.execute_script("window.scrollTo(0, document.body.scrollHeight)")
    figures = shown(d, "all results", lambda f: len(f) == n)
    assert [image_id(f["src"]) for f in figures] == [int(r["id"]) for r in expected]

    # an image from the file chooser: it is its own best match
    d.execute_script("window.scrollTo(0, 0)")
    chooser = d.execute_script("return document.querySelector('clip-front').shadowRoot.querySelector('#filechooser')")
    chooser.send_keys(site.paths[9])
    figures = shown(d, "the image query's results", lambda f: image_id(f[0]["src"]) == int(site.ids[9]))
    expected = lakelens_search(site.index, "--image", site.paths[9], "-k", "40")
    assert [image_id(f["src"]) for f in figures[:40]] == [int(r["id"]) for r in expected]
    assert float(figures[0]["similarity"]) == pytest.approx(1.0, abs=1e-4)

    # "search by this image" on a result sends its url back: lakelens searches by that image's stored vector
    target = image_id(figures[5]["src"])
    d.execute_script("document.querySelector('clip-front').shadowRoot"
                     ".querySelectorAll('#products figure')[5].querySelector('.subImageSearch').click()")
    figures = shown(d, "the similar images", lambda f: image_id(f[0]["src"]) == target)
    assert float(figures[0]["similarity"]) == pytest.approx(1.0, abs=1e-4)
    d.save_screenshot(str(tmp_path / "similar.png"))
