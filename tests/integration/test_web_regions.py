"""Region hits on the search page in real headless Chromium: an index built by the real embed and index jobs
with embed.regions; a query by one image's crop finds that image with the crop's box (API and page), the
card and the large view outline the box in percentages of the picture, and a whole-image hit has none."""

from __future__ import annotations

import io

import numpy as np
import pytest
import requests
import webindex
from conftest import ROOT
from PIL import Image
from selenium.webdriver.common.by import By

from integration.test_web_browser import browser, hits, status, wait_for  # noqa: F401 (browser: fixture)
from lakelens import EmbedJob, IndexJob, Searcher, config
from lakelens.ingest import regions

BOXES = regions.boxes(2)
# a wide, a tall and a square picture: letterboxed both ways in the cards' 160 px boxes
SIZES = [(180, 90), (70, 140), (100, 100)]


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def regional(spark, tmp_path_factory):
    root = tmp_path_factory.mktemp("web-regions")
    img, table, index = root / "img", root / "table", root / "index"
    img.mkdir()
    rng = np.random.default_rng(8)
    files = []
    for j, (w, h) in enumerate(SIZES):
        files.append(img / f"pic{j}.png")
        Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).save(files[-1])
    conf = config.load(ROOT / "conf" / "local.yaml", [f"embed.images={img}", f"embed.table={table}",
                                                      "embed.regions=true", f"index.table={table}",
                                                      f"index.index={index}"])
    EmbedJob(spark=spark, conf=conf, log=quiet).launch()
    IndexJob(spark=spark, conf=conf, log=quiet).launch()
    server = webindex.ThreadServer(index)
    server.app.live.warm()
    rows = {r["path"]: r for r in spark.read.format("delta").load(str(table)).collect()}
    yield {"base": server.base, "index": index, "files": files, "rows": rows}
    server.close()


def crop_png(path, box) -> bytes:
    with Image.open(path) as im:
        out = io.BytesIO()
        regions.crop(im.convert("RGB"), box).save(out, "PNG")
        return out.getvalue()


def percent(style: str) -> dict:
    """'left: 50%; top: 0%; ...' -> {'left': 50.0, ...}"""
    out = {}
    for part in style.split(";"):
        if ":" in part:
            key, value = (x.strip() for x in part.split(":", 1))
            assert value.endswith("%"), style
            out[key] = float(value[:-1])
    return out


def expected_style(box) -> dict:
    x0, y0, x1, y1 = (100 * v for v in box)
    return {"left": x0, "top": y0, "width": x1 - x0, "height": y1 - y0}


def close(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-2 for k in a)


def outline_geometry(driver, scope: str) -> dict:
    """Where the outline and its picture are on screen, and the picture's natural size."""
    return driver.execute_script(
        "const s = document.querySelector(arguments[0]); const o = s.querySelector('.outline');"
        "const p = s.querySelector('.pic'); const i = p.querySelector('img');"
        "const r = e => { const b = e.getBoundingClientRect(); return [b.left, b.top, b.width, b.height]; };"
        "return {style: o.getAttribute('style'), outline: r(o), pic: r(p), natural: [i.naturalWidth, i.naturalHeight],"
        "ratio: getComputedStyle(p).getPropertyValue('--r')};", scope)


def on_the_image(g: dict, box) -> None:
    """The frame has the image's shape, and the outline covers the box's part of it (2 px of rounding)."""
    (px, py, pw, ph), (ox, oy, ow, oh) = g["pic"], g["outline"]
    nw, nh = g["natural"]
    assert abs(pw / ph - nw / nh) < 0.03, g
    want = (px + box[0] * pw, py + box[1] * ph, (box[2] - box[0]) * pw, (box[3] - box[1]) * ph)
    assert max(abs(a - b) for a, b in zip((ox, oy, ow, oh), want)) < 2, (g, want)


def test_region_hits_are_outlined_on_cards_and_large_view(regional, browser, tmp_path):  # noqa: F811
    d = browser
    wide = regional["files"][0]
    row = regional["rows"][f"file:{wide}"]
    box = BOXES[1]  # the top right cell of the wide picture

    # the Searcher: the crop's stored vector finds its image, with the box
    s = Searcher.open(regional["index"])
    hit = s.search_vector(np.array(row["regions"][1]["embedding"], np.float32), k=3).iloc[0]
    assert hit["id"] == row["id"] and np.allclose(hit["box"], box)
    # the API: the crop uploaded as a query image finds the same, its rows carry the box
    crop = tmp_path / "crop.png"
    crop.write_bytes(crop_png(wide, box))
    r = requests.post(regional["base"] + "/api/search/image", files={"image": ("crop.png", crop.read_bytes())},
                      data={"k": "3"}, timeout=60)
    assert r.status_code == 200, r.text
    first = r.json()["results"][0]
    assert first["id"] == str(row["id"]) and np.allclose(first["box"], box)
    assert first["score"] > 0.999
    whole = requests.get(f"{regional['base']}/api/similar/{row['id']}", params={"k": 3}, timeout=60).json()
    assert whole["results"][0]["id"] == str(row["id"]) and whole["results"][0]["box"] is None

    # the page: the same upload; the first card outlines the box, in percentages of the picture's frame
    d.get(regional["base"] + "/")
    wait_for(d, lambda d: d.find_elements(By.CSS_SELECTOR, "#upload input[type=file]"), "the page")
    d.find_element(By.CSS_SELECTOR, "#upload input[type=file]").send_keys(str(crop))
    wait_for(d, lambda d: status(d).startswith("3 results for uploaded image"), "upload results")
    card = hits(d)[0]
    assert card.get_attribute("data-id") == str(row["id"])
    wait_for(d, lambda d: d.execute_script(
        "const p = document.querySelector('#results .hit .pic');"
        "return p.style.getPropertyValue('--r') !== '';"), "the first picture's shape")
    g = outline_geometry(d, "#results .hit")
    assert close(percent(g["style"]), expected_style(box)), g["style"]
    on_the_image(g, box)
    outlined = d.execute_script("return Array.from(document.querySelectorAll('#results .hit')).map("
                                "c => [c.dataset.id, c.querySelectorAll('.outline').length]);")
    api_rows = r.json()["results"]
    assert outlined == [[x["id"], int(x["box"] is not None)] for x in api_rows]

    # the large view outlines it too
    card.find_element(By.TAG_NAME, "img").click()
    wait_for(d, lambda d: d.find_elements(By.CSS_SELECTOR, "#viewer.open .frame .outline"), "the large view's outline")
    wait_for(d, lambda d: d.execute_script("const p = document.querySelector('#viewer .pic');"
                                           "return p.style.getPropertyValue('--r') !== '';"), "the large picture")
    g = outline_geometry(d, "#viewer")
    assert close(percent(g["style"]), expected_style(box))
    on_the_image(g, box)
    d.find_element(By.ID, "viewer-close").click()

    # "more like this": the image's own vector, a whole-image hit, with no outline on the card or large
    d.get(f"{regional['base']}/?similar={row['id']}")
    wait_for(d, lambda d: status(d).startswith("3 results for images similar to"), "similar results")
    card = hits(d)[0]
    assert card.get_attribute("data-id") == str(row["id"]) and not card.find_elements(By.CLASS_NAME, "outline")
    card.find_element(By.TAG_NAME, "img").click()
    wait_for(d, lambda d: d.find_elements(By.CSS_SELECTOR, "#viewer.open #more-like-this"), "the large view")
    assert not d.find_elements(By.CSS_SELECTOR, "#viewer .outline")
