"""Take the screenshot of the search page that the README and docs/index.md show (docs/img/page.png).

It uses the browser tests' own tooling: a small index of generated images with tags and captions
(tests/webindex.py), the real app under waitress, and Debian's headless Chromium through selenium. Offline;
about a minute on 2 cores. Run: .venv/bin/python scripts/page_screenshot.py [OUT.png]"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
from PIL import Image
from selenium.webdriver.support.ui import WebDriverWait

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import webindex  # noqa: E402

from lakelens.train import synth  # noqa: E402

QUERY = "/?q=red+circle&mode=hybrid&k=12"
WIDTH, HEIGHT, SHOWN_WIDTH = 1280, 860, 960


def main(out: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="lake-") as tmp:
        root = Path(tmp)
        # generated images only (the tests' index adds hostile file names, which a screenshot need not show)
        paths = list(pd.read_csv(synth.write_dataset(root / "photos", 40, seed=11))["path"])
        data = webindex.publish(root / "index", paths, keywords=True)
        server = webindex.ThreadServer(data.index)
        driver = webindex.headless_chromium(WIDTH, HEIGHT, "--hide-scrollbars")
        try:
            driver.get(server.base + QUERY)
            WebDriverWait(driver, 120, poll_frequency=0.2).until(lambda d: d.execute_script(
                "const imgs = Array.from(document.querySelectorAll('#results img'));"
                "return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0);"))
            time.sleep(1)  # let the facets and the layout settle
            raw = root / "page.png"
            driver.save_screenshot(str(raw))
        finally:
            driver.quit()
            server.close()
        image = Image.open(raw).convert("RGB")
        image = image.resize((SHOWN_WIDTH, round(image.height * SHOWN_WIDTH / image.width)), Image.LANCZOS)
        out.parent.mkdir(parents=True, exist_ok=True)
        image.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)
    print(f"wrote {out} ({out.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "img" / "page.png")
