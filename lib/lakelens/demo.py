"""The offline end-to-end demo: generated captioned images -> Spark embed job (Delta, incremental) -> index -> queries."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from . import config, synth


def run_demo(out: str = "build/demo", n_images: int = 600, conf_path: str | None = None,
             overrides=(), master: str | None = None) -> dict:
    from .embed_job import EmbedJob
    from .index_job import IndexJob
    from .search import Searcher
    from .spark import get_session

    t0 = time.time()
    out_dir = Path(out).resolve()
    if out_dir.exists():
        shutil.rmtree(out_dir)
    images = out_dir / "images"
    table = out_dir / "embeddings"
    index_dir = out_dir / "index"
    print(f"[demo] generating {n_images} captioned images in {images}")
    synth.write_dataset(images, n_images, seed=1)
    (images / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG")
    conf = config.load(conf_path, list(overrides), spark={"master": master},
                       embed={"images": str(images), "table": str(table)},
                       index={"table": str(table), "index": str(index_dir)})
    spark, owned = get_session(conf.spark)
    try:
        print("[demo] run 1: embed every image into a Delta table")
        first = EmbedJob(spark=spark, conf=conf).launch()
        print("[demo] run 2: nothing changed, so nothing is embedded")
        second = EmbedJob(spark=spark, conf=conf).launch()
        print("[demo] run 3: after adding 20 images, changing 1 and deleting 5")
        synth.write_dataset(images, 20, seed=2, start=n_images)
        synth.render(synth.samples(1, seed=3)[0], seed=3).save(images / "img000001.jpg")
        for p in sorted(images.glob("img0000[2-6]*.jpg"))[:5]:
            p.unlink()
        third = EmbedJob(spark=spark, conf=conf).launch()
        df = spark.read.format("delta").load(str(table))
        print(f"[demo] table {table}: {df.count()} rows; errors:")
        df.where("error is not null").select("path", "error").show(truncate=False)
        df.select("id", "path", "width", "height", "model").orderBy("path").show(5, truncate=60)
        print("[demo] index job: sharded FAISS index, published atomically")
        built = IndexJob(spark=spark, conf=conf).launch()
        print("[demo] index job again: the table has not changed, so nothing is rebuilt")
        IndexJob(spark=spark, conf=conf).launch()
    finally:
        if owned:
            spark.stop()
    searcher = Searcher.open(index_dir)
    query_image = sorted(images.glob("*.png"))[0]
    print(f"[demo] image -> image, query {query_image.name} (an image is its own nearest neighbour):")
    print(searcher.search_image(query_image, k=3).to_string(index=False))
    print("[demo] text -> image, 'a large red circle on the left' (the model is random-init here; "
          "fine-tuning comes with the evaluation work):")
    print(searcher.search_text("a large red circle on the left", k=3).to_string(index=False))
    result = {"run1": first.to_dict(), "run2": second.to_dict(), "run3": third.to_dict(),
              "index": built.to_dict(), "seconds": round(time.time() - t0, 1)}
    print(f"[demo] done in {result['seconds']} s")
    return result
