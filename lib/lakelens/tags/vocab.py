"""Tag vocabularies: a CSV of (tag[, prompts][, synonyms][, parent]) loaded and checked, its content digest,
and each tag's text vector from a prompt ensemble (the CLIP paper's zero-shot recipe).

A vocabulary file: `#` lines are comments; the first other line is the header. `prompts` and `synonyms`
hold several values separated by `|`; a prompt may contain `{}`, which becomes the tag's name. A tag with
no prompts of its own is embedded through the templates (open_clip's SIMPLE or OPENAI ImageNet templates).
`parent` names another tag of the file: an image tagged "dog" is also an "animal" to the keyword index
(`ancestors`), and labels of a child count for its parents in calibration and evaluation."""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from lakelens.errors import ConfigError

COLUMNS = ("tag", "prompts", "synonyms", "parent")
TEMPLATE_SETS = ("simple", "openai")
DIGEST_CHARS = 16


class VocabError(ConfigError):
    """A vocabulary file is unreadable or inconsistent; the message names the file, line and column."""


@dataclass(frozen=True)
class TagEntry:
    name: str
    prompts: tuple[str, ...] = ()
    synonyms: tuple[str, ...] = ()
    parent: str | None = None
    line: int = 0


class Vocab:
    """The tags of one vocabulary file, in file order."""

    def __init__(self, entries: Sequence[TagEntry], path: str = ""):
        self.path = path
        self.entries = tuple(entries)
        self._by_name = {e.name: e for e in self.entries}
        self._words = {}  # lower-cased tag names and synonyms -> tag name
        for e in self.entries:
            for word in (e.name, *e.synonyms):
                self._words.setdefault(word.lower(), e.name)
        canonical = [[e.name, list(e.prompts), list(e.synonyms), e.parent] for e in self.entries]
        self.digest = hashlib.sha256(json.dumps(canonical, ensure_ascii=False).encode()).hexdigest()[:DIGEST_CHARS]

    @property
    def tags(self) -> list[str]:
        return [e.name for e in self.entries]

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, tag: str) -> bool:
        return tag in self._by_name

    def entry(self, tag: str) -> TagEntry:
        return self._by_name[tag]

    def synonyms(self, tag: str) -> list[str]:
        """The tag's synonyms from the file; [] for a tag the vocabulary does not hold (manual tags)."""
        e = self._by_name.get(tag)
        return list(e.synonyms) if e else []

    def ancestors(self, tag: str) -> list[str]:
        """Parent, grandparent, ... up the chain (no cycles: the loader refuses them); [] for unknown tags."""
        out, e = [], self._by_name.get(tag)
        while e is not None and e.parent:
            out.append(e.parent)
            e = self._by_name.get(e.parent)
        return out

    def resolve(self, word: str) -> str | None:
        """The tag a word names (a tag or one of its synonyms, case-insensitively), or None."""
        return self._words.get(str(word).strip().lower())

    def prompts(self, tag: str, templates: str | Sequence = "simple") -> list[str]:
        """The texts whose vectors are averaged into the tag's vector."""
        e = self._by_name[tag]
        if e.prompts:
            return [p.replace("{}", e.name) for p in e.prompts]
        return [t(e.name) if callable(t) else str(t).replace("{}", e.name) for t in template_list(templates)]


def template_list(templates: str | Sequence) -> list:
    """"simple" (7 templates, the default: fast) or "openai" (80: the CLIP paper's ImageNet set), or a
    list of strings with `{}`."""
    if isinstance(templates, str):
        from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

        sets = {"simple": SIMPLE_IMAGENET_TEMPLATES, "openai": OPENAI_IMAGENET_TEMPLATES}
        if templates not in sets:
            raise ConfigError(f"tag.templates: {templates!r} is not one of {', '.join(TEMPLATE_SETS)}")
        return list(sets[templates])
    out = [str(t) for t in templates]
    if not out or not all("{}" in t for t in out):
        raise ConfigError(f"tag.templates: a list of templates must hold `{{}}` in each, got {out!r}")
    return out


def _split(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split("|") if v.strip())


def builtin_vocabs() -> list[str]:
    """Names of the vocabularies shipped with the package (package data lakelens/data/vocab/NAME.csv)."""
    return sorted(f.name[:-4] for f in _builtin_dir().iterdir() if f.name.endswith(".csv"))


def _builtin_dir() -> Path:
    # a real folder: the package is installed from a wheel or a checkout, never imported from a zip
    return Path(str(resources.files("lakelens") / "data" / "vocab"))


def is_builtin(path: str | Path) -> bool:
    """True for a file of the built-in vocabularies' folder (thresholds of those go to the user's folder)."""
    return Path(path).resolve().parent == _builtin_dir().resolve()


def vocab_path(name: str | Path) -> Path:
    """The vocabulary file `name` stands for: a bare name (no folder, no extension: `photo`) names a built-in
    vocabulary; anything else is a file path. A bare name that is no built-in but a file here is that file."""
    text = str(name)
    bare = not any(sep and sep in text for sep in ("/", os.sep, os.altsep)) and not Path(text).suffix
    if not bare:
        return Path(text)
    builtin = _builtin_dir() / f"{text}.csv"
    if builtin.is_file():
        return builtin
    if Path(text).is_file():
        return Path(text)
    raise VocabError(f"{text}: no vocabulary file of that name and no built-in vocabulary (built in: "
                     f"{', '.join(builtin_vocabs())}; a file of your own needs its path, e.g. ./{text}.csv)")


def load_vocab(path: str | Path) -> Vocab:
    """Read and check a vocabulary file, or a built-in vocabulary by name (`vocab_path`). VocabError (a
    ConfigError) names the file, line and column of the first problem: a missing tag column, an unknown
    column, an empty or duplicate tag, a synonym two tags share, an unknown parent, a cycle of parents."""
    p = vocab_path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise VocabError(f"{p}: cannot read the vocabulary file ({e})") from None

    def fail(line: int, column: str | None, why: str) -> VocabError:
        return VocabError(f"{p}, line {line}" + (f", column '{column}'" if column else "") + f": {why}")

    header, rows = None, []
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        fields = [f.strip() for f in next(csv.reader([raw]))]
        if header is None:
            header = [f.lower() for f in fields]
            for name in header:
                if name not in COLUMNS:
                    raise fail(number, name, f"unknown column; allowed: {', '.join(COLUMNS)}")
            if "tag" not in header:
                raise fail(number, "tag", "the header has no tag column")
            if len(set(header)) != len(header):
                raise fail(number, None, "a column is named twice in the header")
            continue
        if len(fields) > len(header):
            raise fail(number, None, f"{len(fields)} fields, the header has {len(header)} columns")
        rows.append((number, dict(zip(header, fields + [""] * (len(header) - len(fields))))))
    if header is None:
        raise VocabError(f"{p}: no header line (tag[,prompts][,synonyms][,parent])")
    if not rows:
        raise VocabError(f"{p}: no tags")
    entries, seen, words = [], {}, {}
    for number, row in rows:
        name = row["tag"]
        if not name:
            raise fail(number, "tag", "empty tag")
        if "|" in name:
            raise fail(number, "tag", f"a tag name cannot hold '|' ({name!r})")
        if name.lower() in seen:
            raise fail(number, "tag", f"duplicate tag {name!r} (first on line {seen[name.lower()]})")
        seen[name.lower()] = number
        synonyms = tuple(s for s in _split(row.get("synonyms", "")) if s.lower() != name.lower())
        entries.append(TagEntry(name, _split(row.get("prompts", "")), synonyms, row.get("parent", "") or None, number))
    for e in entries:
        for word in (e.name, *e.synonyms):
            owner = words.setdefault(word.lower(), e)
            if owner is not e:
                column = "tag" if word == e.name else "synonyms"
                raise fail(e.line, column, f"{word!r} already names tag {owner.name!r} (line {owner.line})")
    by_lower = {e.name.lower(): e for e in entries}
    fixed = []
    for e in entries:
        if e.parent is not None:
            parent = by_lower.get(e.parent.lower())
            if parent is None:
                raise fail(e.line, "parent", f"unknown parent {e.parent!r} (not a tag of this file)")
            e = TagEntry(e.name, e.prompts, e.synonyms, parent.name, e.line)
        fixed.append(e)
    vocab = Vocab(fixed, str(p))
    for e in fixed:
        chain, cur = {e.name}, e
        while cur.parent:
            if cur.parent in chain:
                raise fail(e.line, "parent", f"a cycle of parents through {e.name!r}")
            chain.add(cur.parent)
            cur = vocab.entry(cur.parent)
    return vocab


def tag_vectors(vocab: Vocab, spec, templates: str | Sequence = "simple", engine: str = "torch", embedder=None,
                batch_size: int = 256) -> np.ndarray:
    """(tags, dim) float32 unit vectors: per tag, the mean of its prompts' unit vectors, renormalised.
    `embedder`: an lakelens.ingest.embedder.Embedder to reuse; else one is made for `spec` (a ModelSpec)."""
    if embedder is None:
        from lakelens.ingest.embedder import Embedder

        embedder = Embedder(spec, decode_threads=1, engine=engine)
    per_tag = [vocab.prompts(t, templates) for t in vocab.tags]
    texts = list(dict.fromkeys(p for ps in per_tag for p in ps))
    vecs = np.concatenate([embedder.embed_texts(texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)])
    vecs = vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
    row = {t: i for i, t in enumerate(texts)}
    out = np.stack([vecs[[row[p] for p in ps]].mean(axis=0) for ps in per_tag])
    return (out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)).astype(np.float32)
