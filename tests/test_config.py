import pytest
from conftest import ROOT

from lakelens import config
from lakelens.config import ConfigError


def test_defaults_and_shipped_files_load():
    default = config.load(ROOT / "conf" / "default.yaml")
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
