"""Model registry: open_clip name + pretrained tag | local checkpoint | random init (seed 0), cached per process."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lakelens.config import ModelConfig
from lakelens.errors import ConfigError, IndexMismatchError, ModelLoadError
from lakelens.files import write_text
from lakelens.ingest.images import Transform
from lakelens.models import local_dir

MODEL_CONFIG_DIR = local_dir.PROJECT_CONFIGS  # this project's architectures (package data)
RANDOM_INIT = "none"
RANDOM_INIT_SEED = 0
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


@functools.cache
def _open_clip():
    """open_clip with this project's small architectures registered (done once per process)."""
    import open_clip

    open_clip.add_model_config(MODEL_CONFIG_DIR)
    return open_clip


@functools.cache
def known_architectures() -> list[str]:
    """open_clip.list_models() plus this project's configs, read from the config files as open_clip reads
    them (a model needs embed_dim, vision_cfg and text_cfg), without importing open_clip."""
    package = importlib.util.find_spec("open_clip")
    folders = [Path(p) / "model_configs" for p in (package.submodule_search_locations or [])] + [MODEL_CONFIG_DIR]
    names = set()
    for folder in folders:
        for f in folder.glob("*.json"):
            cfg = json.loads(f.read_text())
            if all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
                names.add(f.stem)
    return sorted(names)


def _looks_like_path(pretrained: str) -> bool:
    return (os.sep in pretrained or pretrained.startswith(".")
            or pretrained.lower().endswith(_CHECKPOINT_SUFFIXES))


DIGEST_CHARS = 16  # hex digits of the checkpoint's sha256 kept in the model key


def digest_cache_dir() -> Path:
    """Where checkpoint digests are kept between processes: $LAKELENS_DIGEST_CACHE, else
    $XDG_CACHE_HOME/lakelens/digests (~/.cache/lakelens/digests)."""
    if os.environ.get("LAKELENS_DIGEST_CACHE"):
        return Path(os.environ["LAKELENS_DIGEST_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lakelens" / "digests"


@functools.lru_cache(maxsize=16)
def _file_digest(path: str, version: tuple) -> str:
    """The digest of one version of a file: from this process's memory, else from the digest cache
    (keyed by the path and the file's device, inode, size, modification and change times: rewriting the
    file changes its change time, which no one can set back), else read and hashed (and cached)."""
    key = hashlib.sha256(repr((os.path.realpath(path), version)).encode()).hexdigest()[:32]
    entry = digest_cache_dir() / key
    try:
        cached = entry.read_text().strip()
        if len(cached) == DIGEST_CHARS and all(c in "0123456789abcdef" for c in cached):
            return cached
    except OSError:
        pass
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    digest = h.hexdigest()[:DIGEST_CHARS]
    try:  # a cache that cannot be written costs a hash per process, nothing else
        entry.parent.mkdir(parents=True, exist_ok=True)
        write_text(entry, digest)
    except OSError:
        pass
    return digest


def checkpoint_digest(path: str) -> str:
    """sha256 of a checkpoint file's bytes (first 16 hex digits), computed once per file version (the
    driver and every Python worker of a job share it through the digest cache)."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise ModelLoadError(f"model.pretrained: checkpoint file not found: {path} ({e.strerror})") from None
    return _file_digest(path, (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))


@dataclass(frozen=True)
class ModelSpec:
    """An open_clip architecture, its weights (tag, checkpoint path or none) and, for a checkpoint, the
    digest of its bytes: new weights written to the same path make a different spec and key."""

    name: str
    pretrained: str = RANDOM_INIT
    digest: str = ""

    @classmethod
    def from_config(cls, conf: ModelConfig) -> ModelSpec:
        pretrained = (conf.pretrained or RANDOM_INIT).strip()
        name = conf.name.strip()
        if local_dir.is_local_dir(name):
            name = local_dir.normalise(name)
            if pretrained.lower() == local_dir.FOLDER_WEIGHTS:  # the folder's own weights, by file name
                pretrained = str(local_dir.folder_checkpoint(local_dir.folder_of(name)))
        if pretrained.lower() == RANDOM_INIT:
            pretrained = RANDOM_INIT
        elif _looks_like_path(pretrained):
            pretrained = str(Path(pretrained).expanduser().resolve())
        spec = cls(name, pretrained)
        if local_dir.is_local_dir(name) and local_dir.folder_of(name).is_dir():
            return spec.with_digest()
        return spec.with_digest() if spec.is_checkpoint and Path(pretrained).is_file() else spec

    @classmethod
    def from_key(cls, key: str) -> ModelSpec:
        """The spec a table row or manifest was made with: `name@pretrained[#digest]`."""
        name, _, rest = key.partition("@")
        pretrained, _, digest = rest.partition("#")
        return cls(name, pretrained or RANDOM_INIT, digest)

    def with_digest(self) -> ModelSpec:
        return ModelSpec(self.name, self.pretrained, self.current_digest())

    def current_digest(self) -> str:
        """The checkpoint's digest; for a model folder, one digest over it and the folder's config and
        tokenizer files (a new vocabulary in the same folder is another model)."""
        weights = checkpoint_digest(self.pretrained) if self.is_checkpoint else ""
        if not local_dir.is_local_dir(self.name):
            return weights
        folder = local_dir.folder_digest(local_dir.folder_of(self.name))
        return hashlib.sha256(f"{weights}|{folder}".encode()).hexdigest()[:DIGEST_CHARS]

    @property
    def key(self) -> str:
        """The string stored in the table's `model` column and in index manifests."""
        return f"{self.name}@{self.pretrained}" + (f"#{self.digest}" if self.digest else "")

    def check_weights(self) -> None:
        """Raise IndexMismatchError when the checkpoint's bytes are no longer those this spec names (a
        fine-tune wrote new weights to the same path): vectors of old and new weights do not compare."""
        if (self.is_checkpoint or local_dir.is_local_dir(self.name)) and self.digest:
            now = self.current_digest()
            if now != self.digest:
                what = (f"the weights at {self.pretrained}" if not local_dir.is_local_dir(self.name) else
                        f"the model folder {local_dir.folder_of(self.name)} (config, tokenizer or weights)")
                raise IndexMismatchError(
                    f"{what} changed (digest {now}) since these vectors were made with digest {self.digest}: "
                    "re-embed and re-index with the new model, or restore the old files")

    @property
    def is_checkpoint(self) -> bool:
        return _looks_like_path(self.pretrained)

    def validate(self) -> None:
        """Raise ConfigError for an unknown architecture or pretrained tag, before any worker starts.
        Names and checkpoint paths are checked without importing open_clip (and torch); pretrained tags
        need open_clip's registry."""
        if local_dir.is_local_dir(self.name):
            local_dir.check_folder(local_dir.folder_of(self.name))
            if self.pretrained != RANDOM_INIT and not self.is_checkpoint:
                raise ConfigError(f"model.pretrained: {self.pretrained!r} for a local-dir model; allowed: "
                                  f"{local_dir.FOLDER_WEIGHTS} (the folder's weights file), a checkpoint path, or none")
        models = known_architectures()
        if self.name not in models and not self.name.startswith(("hf-hub:", local_dir.PREFIX)):
            raise ConfigError(f"model.name: unknown open_clip architecture {self.name!r}; "
                              f"known: {', '.join(models[:12])}, ... (open_clip.list_models())")
        if self.pretrained == RANDOM_INIT or self.name.startswith("hf-hub:"):
            return
        if self.is_checkpoint:
            if not Path(self.pretrained).is_file():
                raise ModelLoadError(f"model.pretrained: checkpoint file not found: {self.pretrained}")
            return
        tags = _open_clip().list_pretrained_tags_by_model(self.name)
        if self.pretrained not in tags:
            raise ConfigError(f"model.pretrained: {self.pretrained!r} is not a pretrained tag of {self.name}; "
                              f"allowed: {', '.join(tags) or '(none)'}, a checkpoint path, or none")


def architecture_config(name: str) -> dict | None:
    """open_clip's config of architecture `name` (this project's small ones included); None for a Hugging
    Face hub or local-dir model, whose config lives with its weights, and for a name open_clip does not know."""
    if name.startswith(("hf-hub:", "local-dir:")):
        return None
    return _open_clip().get_model_config(name)


def is_coca(model) -> bool:
    """True for open_clip's CoCa (a CLIP with a text decoder that writes captions): its encode_image and
    encode_text give the contrastive vectors like any CLIP's, so it embeds and indexes as one."""
    return hasattr(model, "text_decoder") and hasattr(model, "_encode_image")


@dataclass
class LoadedModel:
    spec: ModelSpec
    model: Any  # open_clip CLIP (or CoCa, see is_coca) module in eval mode
    preprocess: Callable  # PIL image -> CHW float tensor
    tokenizer: Callable
    image_size: int
    dim: int

    @property
    def transform(self) -> Transform | None:
        """The model's preprocessing as images.Transform (numpy, no torch), or None where it does not
        cover the model's settings."""
        return Transform.from_cfg(getattr(self.model.visual, "preprocess_cfg", None) or {})


def _hub_reachable(timeout: float = 3.0) -> bool:
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if os.environ.get("HF_HUB_OFFLINE"):
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def init_decoder(model) -> None:
    """Give a CoCa's text decoder output projection its initial weights. open_clip allocates it with
    torch.empty and never runs the decoder's init_parameters, so at random init it holds whatever memory it
    got (zeros here, so no gradient reaches the decoder until it grows): not the same in every process, and
    slow to train. Drawn from the seeded generator like the rest, with the std open_clip's init would use."""
    import torch

    if not is_coca(model):
        return
    proj = model.text_decoder.text_projection
    with torch.no_grad():
        torch.nn.init.normal_(proj, std=proj.shape[0] ** -0.5)


def _create(spec: ModelSpec):
    import torch

    oc = _open_clip()
    if local_dir.is_local_dir(spec.name):
        return _create_local_dir(spec)
    if spec.pretrained == RANDOM_INIT:
        # fork_rng keeps the caller's RNG state untouched; the seed makes every process build the same weights
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            created = oc.create_model_and_transforms(spec.name, pretrained=None)
            init_decoder(created[0])
            return created
    try:
        if not spec.is_checkpoint and not _hub_reachable():
            # Fail in seconds instead of minutes of retries; weights already in the local cache still load.
            from huggingface_hub import constants

            os.environ["HF_HUB_OFFLINE"] = "1"
            constants.HF_HUB_OFFLINE = True
        return oc.create_model_and_transforms(spec.name, pretrained=spec.pretrained)
    except Exception as e:
        where = ("the checkpoint file" if spec.is_checkpoint
                 else "the model hub (is this machine offline?)")
        raise ModelLoadError(
            f"could not load weights {spec.pretrained!r} for {spec.name} from {where}: "
            f"{type(e).__name__}: {str(e)[:300]}. To run offline, download the open_clip checkpoint "
            f"on a machine with access and pass its local path: --pretrained /path/to/open_clip_model.safetensors "
            f"(config key model.pretrained).") from e


def _create_local_dir(spec: ModelSpec):
    """A model folder's architecture, random init (seed 0) or the weights of spec.pretrained; its text tower
    is never fetched from the hub (its weights come with the checkpoint)."""
    import torch

    oc = _open_clip()
    try:
        with local_dir.offline(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            created = oc.create_model_and_transforms(spec.name, load_weights=False, pretrained_text=False)
            init_decoder(created[0])
            if spec.is_checkpoint:
                oc.load_checkpoint(created[0], spec.pretrained)
            return created
    except Exception as e:
        raise ModelLoadError(f"could not load the model folder {local_dir.folder_of(spec.name)}"
                             + (f" with the weights {spec.pretrained}" if spec.is_checkpoint else "")
                             + f": {type(e).__name__}: {str(e)[:300]}") from e


def tokenizer_of(spec: ModelSpec):
    """open_clip's tokenizer for the architecture; a model folder's Hugging Face tokenizer, from the folder."""
    if not local_dir.is_local_dir(spec.name):
        return _open_clip().get_tokenizer(spec.name)
    folder = local_dir.folder_of(spec.name)
    local_dir.check_folder(folder)
    try:
        with local_dir.offline():
            return _open_clip().get_tokenizer(spec.name)
    except Exception as e:
        raise ModelLoadError(f"could not load the tokenizer of the model folder {folder} "
                             f"({local_dir.TOKENIZER_FILE}, tokenizer_config.json): {type(e).__name__}: {str(e)[:300]}") from e


def weights_stamp(spec: ModelSpec) -> tuple:
    """Size and mtime of a checkpoint file, so a file rewritten in place (a new fine-tune into the same
    folder) is loaded afresh instead of served stale from the cache."""
    if not spec.is_checkpoint:
        return ()
    try:
        st = os.stat(spec.pretrained)
        return st.st_size, st.st_mtime_ns
    except OSError:
        return ()


def load(spec: ModelSpec) -> LoadedModel:
    """Build (once per process) the model for `spec`; Spark's reused Python workers keep it between tasks.
    A spec with a digest loads only the weights of that digest."""
    spec.check_weights()
    stamp = weights_stamp(spec)
    if local_dir.is_local_dir(spec.name):
        stamp += local_dir.folder_stamp(local_dir.folder_of(spec.name))
    return _load(spec, stamp)


@functools.lru_cache(maxsize=4)
def _load(spec: ModelSpec, stamp: tuple) -> LoadedModel:
    spec.validate()
    model, _, preprocess = _create(spec)
    model.eval()
    size = model.visual.image_size
    image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
    dim = int(model.text_projection.shape[1]) if getattr(model, "text_projection", None) is not None \
        else int(model.visual.output_dim)
    tokenizer = tokenizer_of(spec)
    return LoadedModel(spec, model, preprocess, tokenizer, image_size, dim)


def clear_cache() -> None:
    """Drop every loaded model of this process (tests that stand in for a fresh worker)."""
    _load.cache_clear()
