"""Region tags on Spark local[2] with real Delta: a real embed run with embed.regions, then the tag job; its
zero-shot and region rows equal the ones worked out by hand from the stored whole-image and crop vectors
and the vocabulary's text vectors (a tag under its threshold on the whole image, at or over it on its best
crop, is a region row with that crop's score); max_tags caps the union with the whole image's tags first;
the keyword index finds region tags with tag:; an incremental run re-scores a changed image's crops from the
change feed and drops a deleted image's rows."""

from __future__ import annotations

import numpy as np
from conftest import ROOT, write_images
from PIL import Image

from lakelens import IndexJob, Searcher, config
from lakelens.ingest.embed_job import EmbedJob
from lakelens.models.registry import ModelSpec
from lakelens.tags.job import TagJob
from lakelens.tags.table import read_tags
from lakelens.tags.vocab import load_vocab, tag_vectors

LOCAL = ROOT / "conf" / "local.yaml"
VOCAB = "tag\nred\ngreen\nblue\ncircle\nsquare\nstar\n"


def quiet(*_):
    pass


def stored(spark, table):
    """path -> (whole vector, crop vectors) of the embedded rows."""
    out = {}
    for r in spark.read.format("delta").load(str(table)).where("error IS NULL").collect():
        out[r["path"]] = (np.array(r["embedding"], np.float32),
                          np.array([c["embedding"] for c in r["regions"]], np.float32))
    return out


def expected(vectors, text, names, threshold, max_tags=0):
    """{(path, tag): (source, score)} by the rule, one image at a time."""
    out = {}
    for path, (whole, crops) in vectors.items():
        ws, best = whole @ text.T, (crops @ text.T).max(axis=0)
        zero = sorted((j for j in range(len(names)) if ws[j] >= threshold), key=lambda j: -ws[j])
        zero = zero[:max_tags] if max_tags else zero
        region = sorted((j for j in range(len(names)) if ws[j] < threshold <= best[j]), key=lambda j: -best[j])
        region = region[:max(0, max_tags - len(zero))] if max_tags else region
        out.update({(path, names[j]): ("zero-shot", ws[j]) for j in zero})
        out.update({(path, names[j]): ("region", best[j]) for j in region})
    return out


def got(spark, tags):
    df = read_tags(spark, str(tags)).toPandas()
    return {(r.path, r.tag): (r.source, r.score) for r in df.itertuples()}


def assert_same(actual, wanted):
    assert {k: v[0] for k, v in actual.items()} == {k: v[0] for k, v in wanted.items()}
    for key, (_, score) in wanted.items():
        assert abs(actual[key][1] - score) < 1e-5, key


def test_region_tags_from_stored_crops(spark, tmp_path, local_conf):
    img, table, tags, index = tmp_path / "img", tmp_path / "table", tmp_path / "tags", tmp_path / "index"
    files = write_images(img, 4, seed=5)
    vocab_file = tmp_path / "tiny.csv"
    vocab_file.write_text(VOCAB)
    embed = local_conf(img, table, "embed.regions=true")
    EmbedJob(spark=spark, conf=embed, log=quiet).launch()
    vectors = stored(spark, table)
    vocab = load_vocab(vocab_file)
    text = tag_vectors(vocab, ModelSpec.from_config(embed.model))
    names = vocab.tags

    # a threshold where some tags pass on the whole image, some only on a crop, and the cap of 2 drops some
    # (random-init weights give no meaning to either; the rule is what is checked)
    whole = np.stack([v[0] for v in vectors.values()]) @ text.T
    best = np.stack([(v[1] @ text.T).max(axis=0) for v in vectors.values()])

    def kinds(t, cap):
        found = [v[0] for v in expected(vectors, text, names, t, cap).values()]
        return found.count("zero-shot"), found.count("region")

    values = np.unique(np.r_[whole.ravel(), best.ravel()])
    # midway between two scores: float rounding in the job's batch matmul cannot move a score across it
    between = [(a + b) / 2 for a, b in zip(values[:-1], values[1:]) if b - a > 1e-4]
    usable = [t for t in between
              if min(kinds(t, 2)) >= 2 and sum(kinds(t, 0)) > sum(kinds(t, 2))]
    assert usable, "no threshold gives both kinds of tags on these images"
    threshold = float(usable[len(usable) // 2])

    def tag(max_tags):
        conf = config.load(LOCAL, [f"tag.table={table}", f"tag.tags={tags}", f"tag.vocab={vocab_file}",
                                   f"tag.threshold={threshold!r}", f"tag.max_tags={max_tags}"])
        return TagJob(spark=spark, conf=conf, log=quiet).launch()

    # the whole image's tags keep their places under the cap, region tags take what is left
    first = tag(2)
    want = expected(vectors, text, names, threshold, 2)
    assert first.mode == "full" and first.scored == 4 and first.tag_rows == len(want)
    assert first.region_rows == kinds(threshold, 2)[1]
    assert_same(got(spark, tags), want)
    rows = read_tags(spark, str(tags)).where("source = 'region'").toPandas()
    assert set(rows["vocab"]) == {vocab.digest} and set(rows["model"]) == {ModelSpec.from_config(embed.model).key}

    # the keyword index takes region rows as tags: tag: finds the images with a region tag
    IndexJob(spark=spark, conf=config.load(LOCAL, [f"index.table={table}", f"index.index={index}",
                                                   f"index.tags={tags}"]), log=quiet).launch()
    name = next(t for (_, t), (source, _) in want.items() if source == "region")
    found = Searcher.open(index).search(tags=[name], k=10)
    assert set(found["path"]) == {p for (p, t) in want if t == name}

    # change one image, delete another: the changed image's crops come through the change feed
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(files[0], "PNG")
    files[1].unlink()
    EmbedJob(spark=spark, conf=embed, log=quiet).launch()
    inc = tag(2)
    assert inc.mode == "incremental" and inc.scored == 1 and inc.removed == 2
    vectors = stored(spark, table)
    assert len(vectors) == 3
    assert_same(got(spark, tags), expected(vectors, text, names, threshold, 2))
