import pytest
from conftest import ROOT

from lakelens import config
from lakelens.config import ConfigError


def test_defaults_and_shipped_files_load(tmp_path, capsys):
    # default.yaml is package data (an installed wheel has no conf/); `lakelens config --defaults` prints it
    from lakelens.cli import main

    assert main(["config", "--defaults"]) == 0
    printed = capsys.readouterr().out
    assert printed == config.defaults_text() and "jars_dir:" in printed and printed.startswith("# Every config key")
    (tmp_path / "default.yaml").write_text(printed)
    default = config.load(tmp_path / "default.yaml")
    assert default == config.Config()  # default.yaml documents exactly the dataclass defaults
    local = config.load(ROOT / "conf" / "local.yaml")
    assert local.spark.master == "local[2]"
    cluster = config.load(ROOT / "conf" / "cluster.example.yaml")
    assert cluster.model.name == "ViT-B-32" and cluster.spark.extra["spark.task.cpus"] == "4"


def test_overrides_and_sections_apply_in_order(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("embed:\n  batch_size: 8\n  format: parquet\n")
    conf = config.load(f, ["embed.batch_size=16", "spark.extra={spark.foo: bar}"], embed={"chunk_size": 5, "images": None})
    assert (conf.embed.batch_size, conf.embed.format, conf.embed.chunk_size) == (16, "parquet", 5)
    assert conf.embed.images == "" and conf.spark.extra == {"spark.foo": "bar"}


@pytest.mark.parametrize("text, key", [
    ("embed:\n  batchsize: 3\n", "embed.batchsize"),
    ("embed:\n  batch_size: many\n", "embed.batch_size"),
    ("embed:\n  batch_size: 0\n", "embed.batch_size"),
    ("embed:\n  format: csv\n", "embed.format"),
    ("embed:\n  draft: maybe\n", "embed.draft"),
    ("sparkk:\n  master: x\n", "sparkk"),
    ("model: 3\n", "model"),
])
def test_bad_config_names_the_key(tmp_path, text, key):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config.load(f)


def test_bad_override_and_missing_file():
    with pytest.raises(ConfigError, match="section.key=value"):
        config.load(None, ["embed.batch_size"])
    with pytest.raises(ConfigError, match="not found"):
        config.load("/nonexistent/lakelens.yaml")


def test_chunk_sizes_follow_the_rate_within_bounds():
    from lakelens.ingest.table import ChunkSizes, Plan

    fixed = ChunkSizes(100)
    fixed.observe(100, 0.5)
    assert (fixed.take(1000), fixed.take(130), fixed.take(40)) == (100, 100, 40)

    timed = ChunkSizes(100, seconds=60)
    assert timed.take(1000) == 100
    timed.observe(100, 10.0)  # 10 files/s: 600 files fill 60 s
    assert timed.take(10_000) == 600
    assert timed.take(899) == 899  # 299 left after 600 would be under half a chunk: taken along
    assert timed.take(900) == 600
    timed.observe(600, 600.0)  # 1 file/s: never under the first chunk's size
    assert timed.take(10_000) == 100
    timed.observe(100, 0.01)  # 10,000 files/s: at most 10x the first chunk's size
    assert timed.take(100_000) == 1000

    plan = Plan(todo=None, to_embed=2300, unread=0, deleted=0, unchanged=0, new=2300, changed=0,
                paths=[f"/p/{i:05d}" for i in range(2300)])
    sizes = ChunkSizes(100, seconds=60)
    got = []
    for chunk in plan.chunks(sizes):
        got.append(len(chunk))
        sizes.observe(len(chunk), len(chunk) / 10.0)  # 10 files/s
    assert got == [100, 600, 600, 600, 400]  # the last 400 are over half a chunk of 600: their own chunk
    assert [len(c) for c in plan.chunks(1000)] == [1000, 1000, 300]


def test_relative_paths_are_made_absolute_against_the_working_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    f = tmp_path / "c.yaml"
    f.write_text("index:\n  index: idx\n  tags: s3a://bucket/tags\n")
    conf = config.load(f, ["dedup.out=../dups", "tag.vocab=~/vocab.csv"],
                       embed={"images": "imgs/*.png", "table": "T"}, caption={"table": "file:rel/t"})
    assert conf.embed.images == f"{tmp_path}/imgs/*.png" and conf.embed.table == f"{tmp_path}/T"
    assert conf.index.index == f"{tmp_path}/idx" and conf.dedup.out == f"{tmp_path.parent}/dups"
    assert conf.tag.vocab.startswith("/") and conf.tag.vocab.endswith("/vocab.csv")
    assert conf.index.tags == "s3a://bucket/tags" and conf.caption.table == "file:rel/t"  # URIs as given
    assert conf.index.table == "" and config.load(None, embed={"table": "/a//b"}).embed.table == "/a//b"
