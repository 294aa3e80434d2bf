import time

import numpy as np
import pytest
import torch

from lakelens import ModelLoadError, ModelSpec
from lakelens.config import ConfigError, ModelConfig
from lakelens.models import registry as models


def test_random_init_is_seeded_and_independent_of_caller_rng():
    spec = ModelSpec("lakelens-tiny")
    torch.manual_seed(123)
    a, _, _ = models._create(spec)
    state_after = torch.rand(1)
    torch.manual_seed(123)
    b, _, _ = models._create(spec)
    assert torch.equal(torch.rand(1), state_after)  # the caller's RNG stream is untouched
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_loaded_model_facts_and_cache():
    m = models.load(ModelSpec("lakelens-tiny"))
    assert (m.image_size, m.dim) == (64, 128)
    assert models.load(ModelSpec("lakelens-tiny")) is m  # one model per process


def test_spec_from_config_normalises():
    assert ModelSpec.from_config(ModelConfig("lakelens-tiny", "None")).key == "lakelens-tiny@none"
    spec = ModelSpec.from_config(ModelConfig("ViT-B-32", "./ckpt/model.pt"))
    assert spec.is_checkpoint and spec.pretrained.startswith("/") and spec.pretrained.endswith("ckpt/model.pt")
    assert ModelSpec.from_config(ModelConfig("ViT-B-32", "laion2b_s34b_b79k")).is_checkpoint is False


def test_unknown_architecture_and_tag_are_config_errors():
    with pytest.raises(ConfigError, match="model.name"):
        ModelSpec("ViT-Nope-99").validate()
    with pytest.raises(ConfigError, match="laion2b_s34b_b79k"):  # the allowed tags are listed
        ModelSpec("ViT-B-32", "no_such_tag").validate()


def test_missing_checkpoint_file(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        models.load(ModelSpec("lakelens-tiny", str(tmp_path / "missing.pt")))


def test_missing_hub_weights_offline_give_one_clear_error():
    t0 = time.time()
    with pytest.raises(ModelLoadError) as info:
        models.load(ModelSpec("ViT-B-32", "laion2b_s34b_b79k"))
    text = str(info.value)
    assert "--pretrained /path/to" in text and "model.pretrained" in text
    assert time.time() - t0 < 60  # no minutes of retries when the hub cannot be reached


def test_local_checkpoint_loads_the_same_weights(tmp_path):
    ref = models.load(ModelSpec("lakelens-tiny"))
    ckpt = tmp_path / "tiny.pt"
    torch.save(ref.model.state_dict(), ckpt)
    loaded = models.load(ModelSpec.from_config(ModelConfig("lakelens-tiny", str(ckpt))))
    x = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        assert np.allclose(ref.model.encode_image(x).numpy(), loaded.model.encode_image(x).numpy(), atol=1e-6)


def test_architecture_names_are_read_as_open_clip_reads_them():
    """validate() checks names from the config files without importing open_clip; the list must be
    open_clip's own (its configs plus the shipped lakelens-tiny)."""
    assert models.known_architectures() == sorted(models._open_clip().list_models())
    assert "lakelens-tiny" in models.known_architectures() and "ViT-B-32" in models.known_architectures()


def test_a_checkpoint_digest_is_kept_between_processes_for_that_version_of_the_file(tmp_path, monkeypatch):
    """The driver and each Python worker of a job need the checkpoint's digest: the first process hashes
    the file, the others read it from the digest cache; writing the file again, even at the same size
    and with its old modification time put back, is another version (its change time moved)."""
    import hashlib
    import os
    import subprocess
    import sys

    cache = tmp_path / "cache"
    monkeypatch.setenv("LAKELENS_DIGEST_CACHE", str(cache))
    ckpt = tmp_path / "w.pt"
    ckpt.write_bytes(b"a" * 1000)
    first = models.checkpoint_digest(str(ckpt))
    assert first == hashlib.sha256(b"a" * 1000).hexdigest()[:16]
    (entry,) = cache.iterdir()
    assert entry.read_text() == first
    entry.write_text("0" * 16)  # what another process finds there is what it uses, without reading the file
    code = f"from lakelens.models import registry; print(registry.checkpoint_digest({str(ckpt)!r}))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "LAKELENS_DIGEST_CACHE": str(cache)})
    assert other.stdout.strip() == "0" * 16, other.stderr[-2000:]
    st = ckpt.stat()
    time.sleep(0.05)
    ckpt.write_bytes(b"b" * 1000)
    os.utime(ckpt, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert ckpt.stat().st_mtime_ns == st.st_mtime_ns and ckpt.stat().st_size == st.st_size
    assert models.checkpoint_digest(str(ckpt)) == hashlib.sha256(b"b" * 1000).hexdigest()[:16]
    assert len(list(cache.iterdir())) == 2
