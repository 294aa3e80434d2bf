"""The keyword index as part of index versions, on Spark local with real Delta tables: built with a full
version, updated with an incremental one (only the images whose rows or tags changed), a tags-only
version that shares the vectors, and the live version's files untouched by the next one."""

from __future__ import annotations

from datetime import datetime

from conftest import ROOT, clustered

from lakelens import IndexJob, Searcher, config, delta_sql, path_id
from lakelens import index as ix
from lakelens.index.keyword import KEYWORD_DIR, KeywordIndex, TagStore
from lakelens.ingest.table import SCHEMA, EmbeddingsTable
from lakelens.tags.table import replace_rows

DIM = 16
VOCAB = "tag,synonyms,parent\nanimal,,\ndog,puppy,animal\ncat,kitty,animal\n"


def path_of(j: int) -> str:
    return f"file:/data/{'2024' if j % 2 else '2023'}/img-{j:04d}.jpg"


def rows(js, seed: int):
    x = clustered(len(js), DIM, clusters=4, seed=seed)
    now = datetime(2026, 1, 1)
    return [(path_id(path_of(j)), path_of(j), "0" * 64, 100, now, 8, 8, "lakelens-tiny@none", [float(v) for v in vec],
             None, now, None) for j, vec in zip(js, x)]


def tag_rows(js, tag_of):
    out = []
    for j in js:
        out.append((path_id(path_of(j)), path_of(j), tag_of(j), 0.3 + j / 1000, "zero-shot", "m", "v"))
        out.append((path_id(path_of(j)), path_of(j), f"a photo of a {tag_of(j)} number {j}", 0.2, "caption", "m", None))
    return out


def write_tags(spark, location, js, tag_of, touched=True):
    from lakelens.tags.table import SCHEMA as TAGS

    df = spark.createDataFrame(tag_rows(js, tag_of), TAGS)
    ids = spark.createDataFrame([(path_id(path_of(j)),) for j in js], "id long") if touched else None
    for source in ("zero-shot", "caption"):
        replace_rows(spark, location, df.where(f"source = '{source}'"), ids, source, {"test": True})


def run(spark, table, tags, folder, vocab):
    conf = config.load(ROOT / "conf" / "local.yaml", [f"index.table={table}", f"index.index={folder}", "index.factory=Flat",
                                                       "index.shards=2", f"index.tags={tags}", f"index.vocab={vocab}"])
    return IndexJob(spark=spark, conf=conf, log=lambda *_: None).launch()


def kind(j: int) -> str:
    return "dog" if j % 3 == 0 else "cat"


def test_keyword_index_follows_index_versions(spark, tmp_path):
    table, tags, folder, vocab = tmp_path / "t", str(tmp_path / "tags"), tmp_path / "idx", tmp_path / "v.csv"
    vocab.write_text(VOCAB)
    delta_sql.create(spark, str(table), SCHEMA, {"delta.enableChangeDataFeed": "true"})
    EmbeddingsTable(spark, str(table)).upsert(spark.createDataFrame(rows(range(30), 1), SCHEMA))
    write_tags(spark, tags, range(30), kind, touched=False)

    first = run(spark, table, tags, folder, vocab)
    assert first.build == "full"
    s = Searcher.open(folder)
    kw = s.manifest["keywords"]
    assert (kw["documents"], kw["build"], kw["table"]) == (30, "full", tags)
    dogs = {path_id(path_of(j)) for j in range(30) if kind(j) == "dog"}
    assert set(s.search(text="tag:dog", k=50)["id"]) == dogs
    assert set(s.search(text="tag:puppy", k=50)["id"]) == dogs  # a synonym
    assert len(s.search(text="tag:animal", k=50)) == 30  # a parent
    assert s.search_text('"number 7"', mode="keyword", k=5)["id"].tolist() == [path_id(path_of(7))]
    assert set(s.search_text("img 0004", mode="keyword", k=3)["id"]) >= {path_id(path_of(4))}  # path words

    # the table changes: 2 new images, one changed (new vector, new tags), one deleted; tags of those follow
    EmbeddingsTable(spark, str(table)).upsert(spark.createDataFrame(rows([30, 31], 2) + rows([5], 3), SCHEMA))
    spark.sql(f"DELETE FROM {delta_sql.table_ref(str(table))} WHERE " + f"id = {path_id(path_of(6))}")
    write_tags(spark, tags, [30, 31, 5], lambda j: "cat" if j == 5 else kind(j))
    second = run(spark, table, tags, folder, vocab)
    assert second.build == "incremental"
    s.reload()
    kw = s.manifest["keywords"]
    assert (kw["build"], kw["documents"], kw["added"], kw["deleted"]) == ("incremental", 31, 3, 4)
    assert set(s.search(text="tag:dog", k=50)["id"]) == (dogs - {path_id(path_of(6))}) | {path_id(path_of(30))}
    assert s.details(path_id(path_of(5)))["tags"][0]["tag"] == "cat"
    assert s.search_text('"number 6"', mode="keyword", k=5).empty
    old = folder / first.version
    assert set(KeywordIndex(old).search([], [], ["dog"], [], 50)[1]) == dogs  # the first version is untouched
    assert len(TagStore(old).ids_with("dog")) == len(dogs)

    # only tags change: a version that shares the vectors and re-indexes one image
    write_tags(spark, tags, [8], lambda j: "dog")
    third = run(spark, table, tags, folder, vocab)
    assert (third.build, third.build_reason) == ("incremental", "the tags changed")
    m = ix.read_manifest(folder, third.version)
    assert m["shards"] == ix.read_manifest(folder, second.version)["shards"]
    assert (m["keywords"]["added"], m["keywords"]["deleted"]) == (1, 1)
    assert (folder / third.version / KEYWORD_DIR).is_dir()
    s.reload()
    assert path_id(path_of(8)) in set(s.search(text="tag:dog", k=50)["id"])
    assert run(spark, table, tags, folder, vocab).build == "none"


def test_a_tags_table_re_created_at_the_same_version_rebuilds_the_keywords(spark, tmp_path):
    import shutil

    table, tags, folder, vocab = tmp_path / "t", str(tmp_path / "tags"), tmp_path / "idx", tmp_path / "v.csv"
    vocab.write_text(VOCAB)
    delta_sql.create(spark, str(table), SCHEMA, {"delta.enableChangeDataFeed": "true"})
    EmbeddingsTable(spark, str(table)).upsert(spark.createDataFrame(rows(range(12), 4), SCHEMA))
    write_tags(spark, tags, range(12), kind, touched=False)
    first = run(spark, table, tags, folder, vocab)
    tags_at = ix.read_manifest(folder)["keywords"]["tags_version"]
    shutil.rmtree(tags)
    write_tags(spark, tags, range(12), lambda j: "cat", touched=False)  # the same commits: the same version
    second = run(spark, table, tags, folder, vocab)
    m = ix.read_manifest(folder)
    assert second.build == "incremental" and "re-created" in second.build_reason and tags in second.build_reason
    assert m["keywords"]["tags_version"] == tags_at and m["keywords"]["build"] == "full"
    assert m["shards"] == ix.read_manifest(folder, first.version)["shards"]  # the vectors are shared
    s = Searcher.open(folder)
    assert s.search(text="tag:dog", k=50).empty and len(s.search(text="tag:cat", k=50)) == 12
    assert run(spark, table, tags, folder, vocab).build == "none"
