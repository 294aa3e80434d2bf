"""Model folders (`local-dir:FOLDER`): open_clip's own layout of a hub model repository kept on local disk,
for models whose tokenizer is a Hugging Face tokenizer (multilingual text towers). Nothing reaches the hub.

    FOLDER/open_clip_config.json   {"model_cfg": {...}, "preprocess_cfg": {...}}; text_cfg.hf_tokenizer_name
                                   makes open_clip use the Hugging Face tokenizer of this folder
    FOLDER/tokenizer.json          the tokenizer (tokenizer_config.json beside it), as save_pretrained writes it
    FOLDER/open_clip_model.safetensors (or open_clip_pytorch_model.bin, ...)   weights, for --pretrained folder

Also: a tokenizer the project trains itself (Hugging Face `tokenizers`) and a small model folder around it,
the offline proof of the whole path (bench/multilingual.py, `lakelens demo --dataset shapes-pt`)."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
from collections.abc import Iterable
from importlib import resources
from pathlib import Path

from lakelens.errors import ModelLoadError

PREFIX = "local-dir:"
FOLDER_WEIGHTS = "folder"  # model.pretrained value: the checkpoint inside the model folder
CONFIG_FILE = "open_clip_config.json"
TOKENIZER_FILE = "tokenizer.json"
# open_clip's order of preference for the weights file of a folder (factory._find_checkpoint_in_dir)
CHECKPOINT_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin",
                    "open_clip_pytorch_model.pth", "model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth")
SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>")
END_OF_WORD = "</w>"  # ids 0..3: pad_id 0, eos_id 3 in the model config
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
# this project's architectures (package data), registry.MODEL_CONFIG_DIR: registry imports this module; a real
# folder, since open_clip.add_model_config takes a path
PROJECT_CONFIGS = Path(str(resources.files("lakelens.models") / "model_configs"))


def is_local_dir(name: str) -> bool:
    return name.startswith(PREFIX)


def folder_of(name: str) -> Path:
    return Path(name[len(PREFIX):])


def normalise(name: str) -> str:
    """`local-dir:./m` -> `local-dir:/abs/m`: the model key names one folder wherever it is read."""
    return PREFIX + str(folder_of(name).expanduser().resolve())


def _missing(folder: Path, what: str, put: str) -> ModelLoadError:
    return ModelLoadError(f"model folder {folder} lacks {what}: {put} (model.name local-dir:{folder})")


def read_config(folder: Path) -> dict:
    """The folder's model_cfg, or ModelLoadError saying what to put where."""
    if not folder.is_dir():
        raise ModelLoadError(f"model folder {folder} not found (model.name local-dir:{folder}): it holds "
                             f"{CONFIG_FILE}, {TOKENIZER_FILE} and the weights")
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise _missing(folder, CONFIG_FILE, 'put open_clip\'s model config there as {"model_cfg": {...}} '
                                            "(embed_dim, vision_cfg, text_cfg)")
    try:
        cfg = json.loads(path.read_text())
        model_cfg = cfg["model_cfg"]
        if not all(k in model_cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
            raise KeyError("embed_dim, vision_cfg or text_cfg")
    except (ValueError, KeyError, TypeError) as e:
        raise ModelLoadError(f"{path}: not an open_clip model config ({type(e).__name__}: {e}); expected "
                             f'{{"model_cfg": {{"embed_dim": ..., "vision_cfg": ..., "text_cfg": ...}}}}') from None
    return model_cfg


def check_folder(folder: Path) -> dict:
    """Config and tokenizer present (weights are checked by whoever asks for them); returns model_cfg."""
    model_cfg = read_config(folder)
    text_cfg = model_cfg["text_cfg"]
    if text_cfg.get("hf_tokenizer_name") and not (folder / TOKENIZER_FILE).is_file():
        raise _missing(folder, TOKENIZER_FILE, f"put the Hugging Face tokenizer's files there ({TOKENIZER_FILE}, "
                                               f"tokenizer_config.json: tokenizer.save_pretrained('{folder}'))")
    hf_model = text_cfg.get("hf_model_name")
    if hf_model and not (Path(hf_model) / "config.json").is_file():
        raise ModelLoadError(f"{folder / CONFIG_FILE}: text_cfg.hf_model_name {hf_model!r} must name a local folder "
                             f"holding the Hugging Face text model's config.json (no model hub here); the "
                             f"text tower's trained weights come from the checkpoint")
    return model_cfg


FOLDER_FILES = (CONFIG_FILE, TOKENIZER_FILE, "tokenizer_config.json")  # what defines a folder's model, weights aside


def folder_stamp(folder: Path) -> tuple:
    """Size and mtime of the folder's config and tokenizer files: a folder rewritten in place (a new
    tokenizer) is loaded afresh and gets new ONNX graphs, not those of the old vocabulary."""
    out = []
    for name in FOLDER_FILES:
        try:
            st = os.stat(folder / name)
            out += [st.st_size, st.st_mtime_ns]
        except OSError:
            out += [-1, -1]
    return tuple(out)


def folder_digest(folder: Path) -> str:
    """sha256 (16 hex digits) of the folder's model config and tokenizer files: part of the model key, so
    vectors made with another vocabulary in the same folder never pass for this one's. Read once per
    version of the files (queries check it every time)."""
    return _folder_digest(str(folder), folder_stamp(folder))


@functools.lru_cache(maxsize=16)
def _folder_digest(folder: str, stamp: tuple) -> str:
    h = hashlib.sha256()
    for name in FOLDER_FILES:
        path = Path(folder) / name
        h.update(name.encode() + b"\0")
        h.update(path.read_bytes() if path.is_file() else b"(absent)")
        h.update(b"\0")
    return h.hexdigest()[:16]


def folder_checkpoint(folder: Path) -> Path:
    """The weights file of the folder, by open_clip's preference, or ModelLoadError."""
    read_config(folder)
    for name in CHECKPOINT_NAMES:
        if (folder / name).is_file():
            return folder / name
    raise _missing(folder, "the weights file", f"put the checkpoint there as {CHECKPOINT_NAMES[0]} (or "
                                               f"{CHECKPOINT_NAMES[2]}), or pass --pretrained /path/to/checkpoint, "
                                               f"or --pretrained none for random init")


@contextlib.contextmanager
def offline():
    """Hugging Face libraries may not reach the hub while a folder's model or tokenizer loads: a file
    that is missing fails at once instead of being looked for online."""
    saved = {k: os.environ.get(k) for k in _OFFLINE_VARS}
    os.environ.update({k: "1" for k in _OFFLINE_VARS})
    try:
        from huggingface_hub import constants

        hub_saved, constants.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE, True
    except ImportError:
        constants = None
    try:
        yield
    finally:
        if constants is not None:
            constants.HF_HUB_OFFLINE = hub_saved
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# --- a tokenizer and model folder of the project's own ----------------------------------------------
def train_tokenizer(texts: Iterable[str], vocab_size: int = 1000):
    """A byte-pair tokenizer trained on `texts` (NFC, lower case, words split at spaces and punctuation;
    accented letters kept: "círculo" and "circulo" differ; a word's last piece ends in </w>, as in CLIP's),
    with <s> ... </s> around every text."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", end_of_word_suffix=END_OF_WORD))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.BPEDecoder(suffix=END_OF_WORD)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), min_frequency=1,
                                  end_of_word_suffix=END_OF_WORD, show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 2), ("</s>", 3)])
    return tok


def save_tokenizer(tok, folder: str | Path) -> Path:
    """Save as a Hugging Face tokenizer folder (tokenizer.json, tokenizer_config.json)."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(folder))
    return folder


def write_model_folder(folder: str | Path, tok, base: str = "lakelens-tiny", name: str = "lakelens-bpe") -> str:
    """A model folder: `base`'s architecture (this project's or open_clip's config) with its own small
    text transformer sized to the tokenizer's vocabulary, pooled at the </s> token. Returns the model name
    (`local-dir:/abs/folder`); use it with --pretrained none to train from scratch."""
    path = PROJECT_CONFIGS / f"{base}.json"
    if path.is_file():
        model_cfg = json.loads(path.read_text())
    else:
        import open_clip

        model_cfg = open_clip.get_model_config(base)
        if model_cfg is None:
            raise ModelLoadError(f"no open_clip config named {base!r} to build a model folder on")
    folder = save_tokenizer(tok, folder)
    model_cfg["text_cfg"].update(vocab_size=tok.get_vocab_size(), hf_tokenizer_name=name, pad_id=0,
                                 eos_id=tok.token_to_id("</s>"), pool_type="eos")
    (folder / CONFIG_FILE).write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {}}, indent=2) + "\n")
    return normalise(PREFIX + str(folder))
