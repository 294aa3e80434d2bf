"""The keyword side of an index version: a BM25 index (tantivy) over each image's tags (with their
synonyms and parents), captions and path words, and the tag and caption files the query driver reads.

    vNNNN/keyword/        tantivy index: id (fast), tag (exact terms for tag: filters), tags, caption, path (BM25)
    vNNNN/tags.arrow      id, term, direct, score, source: every filter term of every image, sorted by id
                          (direct: the tag itself, not a synonym or parent); result chips, tag: filters, facets
    vNNNN/captions.arrow  id, caption, score: each image's best caption, sorted by id

tantivy over bm25s: phrase queries (positions), boolean must / must-not clauses for filters, deletes by id,
and immutable segment files, so an incremental version hard-links the live version's segments and writes
only new ones (its cost follows the change). No Spark here: the query driver imports this module."""

from __future__ import annotations

import os
import re
import shutil
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lakelens.files import write_sorted_arrow
from lakelens.index.layout import CAPTIONS_FILE, KEYWORD_DIR, TAGS_FILE

TEXT_FIELDS = ("tags", "caption", "path")  # searched by free words and phrases, scored by BM25
TAGS_SCHEMA = pa.schema([("id", pa.int64()), ("term", pa.string()), ("direct", pa.bool_()), ("score", pa.float32()),
                         ("source", pa.string())])
CAPTIONS_SCHEMA = pa.schema([("id", pa.int64()), ("caption", pa.large_string()), ("score", pa.float32())])
WRITER_HEAP = 64_000_000
_LOCKS = (".tantivy-writer.lock", ".tantivy-meta.lock")


# --- words -------------------------------------------------------------------------------------------
def split_word(piece: str) -> list[str]:
    """camelCase, digit runs and letter runs apart: "IMG1234beachDay" -> IMG, 1234, beach, Day;
    "HTMLParser" -> HTML, Parser. Any letters, not only ASCII."""
    out, cur = [], ""
    for i, ch in enumerate(piece):
        if cur:
            prev = cur[-1]
            nxt = piece[i + 1] if i + 1 < len(piece) else ""
            boundary = (prev.isdigit() != ch.isdigit()
                        or (prev.islower() and ch.isupper())
                        or (prev.isupper() and ch.isupper() and nxt.islower()))
            if boundary:
                out.append(cur)
                cur = ""
        cur += ch
    if cur:
        out.append(cur)
    return out


_NON_WORD = re.compile(r"[\W_]+", re.UNICODE)


def words(text: str) -> list[str]:
    """Lower-case words of free text, split at anything that is not a letter or digit (as the index's
    tokenizer splits captions and tags)."""
    return [w for w in _NON_WORD.split(unicodedata.normalize("NFC", text).lower()) if w]


def path_words(path: str) -> list[str]:
    """Words of a path: every folder and the file name, split on separators, digit runs and camelCase,
    lower-cased; the scheme and bucket host markers (s3a://, file:) are dropped."""
    rest = re.sub(r"^[a-zA-Z][\w+.-]*:(//)?", "", unicodedata.normalize("NFC", path))
    out = []
    for piece in _NON_WORD.split(rest):
        out += [w.lower() for w in split_word(piece) if w]
    return out


# --- the tantivy index --------------------------------------------------------------------------------
def _tantivy():
    import tantivy  # imported when a keyword index is used, not for every query-side import

    return tantivy


def schema():
    t = _tantivy()
    b = t.SchemaBuilder()
    b.add_integer_field("id", stored=True, indexed=True, fast=True)
    b.add_text_field("tag", tokenizer_name="raw", index_option="basic")  # exact terms: tag:dog filters
    for name in TEXT_FIELDS:
        b.add_text_field(name, tokenizer_name="default", index_option="position")
    return b.build()


@dataclass
class TagRow:
    tag: str
    score: float
    source: str


def expand(tag: str, vocab) -> list[str]:
    """A tag's filter terms, which are also its searchable words: itself, its synonyms, its parents and
    theirs. `vocab` is a lakelens.tags.vocab.Vocab or None (the tag alone)."""
    terms = [tag.lower()]
    if vocab is not None and tag in vocab.tags:
        for t in [*vocab.synonyms(tag), *vocab.ancestors(tag)]:
            terms.append(t.lower())
        for parent in vocab.ancestors(tag):
            terms += [s.lower() for s in vocab.synonyms(parent)]
    return list(dict.fromkeys(terms))


class TagFiles:
    """Collects the rows of tags.arrow and captions.arrow while documents are added."""

    def __init__(self):
        self.t_id, self.t_term, self.t_direct, self.t_score, self.t_source = [], [], [], [], []
        self.c_id, self.c_text, self.c_score = [], [], []

    def add(self, id_: int, tags: list[TagRow], captions: list[tuple[str, float]], vocab) -> tuple[list, list]:
        terms_all, words_all = [], []
        for row in sorted(tags, key=lambda r: -(r.score or 0.0)):
            terms = expand(row.tag, vocab)
            for j, term in enumerate(terms):
                self.t_id.append(id_)
                self.t_term.append(term)
                self.t_direct.append(j == 0)
                self.t_score.append(row.score if row.score is not None else np.nan)
                self.t_source.append(row.source)
            terms_all += terms
            words_all += terms
        if captions:
            text, score = max(captions, key=lambda c: (c[1] if c[1] is not None else -1.0))
            self.c_id.append(id_)
            self.c_text.append(text)
            self.c_score.append(score if score is not None else np.nan)
        return list(dict.fromkeys(terms_all)), words_all

    def tables(self) -> tuple[pa.Table, pa.Table]:
        tags = pa.table({"id": pa.array(self.t_id, pa.int64()), "term": pa.array(self.t_term, pa.string()),
                         "direct": pa.array(self.t_direct, pa.bool_()), "score": pa.array(self.t_score, pa.float32()),
                         "source": pa.array(self.t_source, pa.string())}, schema=TAGS_SCHEMA)
        caps = pa.table({"id": pa.array(self.c_id, pa.int64()), "caption": pa.array(self.c_text, pa.large_string()),
                         "score": pa.array(self.c_score, pa.float32())}, schema=CAPTIONS_SCHEMA)
        return tags, caps


def _read_arrow(path: Path) -> pa.Table:
    return pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()


class KeywordWriter:
    """Writes a version's keyword part into a staging folder: a new index, or (`base`: the live
    version's folder) the live one's segments hard-linked, the changed images deleted and added again."""

    def __init__(self, staged: Path, vocab=None, base: Path | None = None, heap: int = WRITER_HEAP):
        t = _tantivy()
        self.staged, self.vocab, self.base = Path(staged), vocab, base
        folder = self.staged / KEYWORD_DIR
        if base is not None and (base / KEYWORD_DIR).is_dir():
            shutil.rmtree(folder, ignore_errors=True)  # a link_version() copy of the folder, if any
            folder.mkdir()
            for f in (base / KEYWORD_DIR).iterdir():
                if f.is_file() and f.name not in _LOCKS:
                    try:
                        os.link(f, folder / f.name)  # segments are immutable; meta.json is replaced, not edited
                    except OSError:
                        shutil.copy2(f, folder / f.name)
            self.index = t.Index(schema(), path=str(folder), reuse=True)
        else:
            base = None
            folder.mkdir(exist_ok=True)
            self.index = t.Index(schema(), path=str(folder), reuse=False)
        self.writer = self.index.writer(heap_size=heap, num_threads=1)
        self.files = TagFiles()
        self.deleted = np.zeros(0, np.int64)
        self.added = 0
        self.base = base

    def delete(self, ids: np.ndarray) -> None:
        """Remove these images' documents (changed or deleted images of an incremental version)."""
        ids = np.unique(np.asarray(ids, np.int64))
        t = _tantivy()
        sch = self.index.schema
        for start in range(0, len(ids), 10_000):
            chunk = [int(i) for i in ids[start:start + 10_000]]
            self.writer.delete_documents_by_query(t.Query.term_set_query(sch, "id", chunk))
        self.deleted = np.union1d(self.deleted, ids)

    def add(self, id_: int, path: str, tags: list[TagRow], captions: list[tuple[str, float]]) -> None:
        t = _tantivy()
        terms, tag_words = self.files.add(int(id_), tags, captions, self.vocab)
        doc = t.Document()
        doc.add_integer("id", int(id_))
        for term in terms:
            doc.add_text("tag", term)
        if tag_words:
            doc.add_text("tags", " ".join(tag_words))
        for text, _ in captions:
            doc.add_text("caption", text)
        doc.add_text("path", " ".join(path_words(path)))
        self.writer.add_document(doc)
        self.added += 1

    def commit(self) -> dict:
        """Commit the index, write the tag and caption files (the live version's rows of untouched images
        kept), and return the manifest's `keywords` entry."""
        self.writer.commit()
        self.writer.wait_merging_threads()
        for lock in _LOCKS:
            (self.staged / KEYWORD_DIR / lock).unlink(missing_ok=True)
        tags, caps = self.files.tables()
        if self.base is not None:
            gone = pa.array(np.union1d(self.deleted, np.asarray(self.files.t_id + self.files.c_id, np.int64)))
            for name, new in ((TAGS_FILE, tags), (CAPTIONS_FILE, caps)):
                old = _read_arrow(self.base / name) if (self.base / name).is_file() else new.schema.empty_table()
                old = old.filter(pc.invert(pc.is_in(old["id"], value_set=gone)))
                merged = pa.concat_tables([old, new])
                if name == TAGS_FILE:
                    tags = merged
                else:
                    caps = merged
        write_sorted_arrow(self.staged / TAGS_FILE, tags)
        write_sorted_arrow(self.staged / CAPTIONS_FILE, caps)
        self.index.reload()
        return {"dir": KEYWORD_DIR, "tags_file": TAGS_FILE, "captions_file": CAPTIONS_FILE,
                "documents": int(self.index.searcher().num_docs), "tag_rows": len(tags), "captions": len(caps),
                "added": self.added, "deleted": int(len(self.deleted)),
                "build": "incremental" if self.base is not None else "full"}


def build_keywords(staged: Path, docs: Iterable[tuple[int, str, list[TagRow], list[tuple[str, float]]]],
                   vocab=None, base: Path | None = None, delete_ids: np.ndarray | None = None) -> dict:
    """The keyword part of a staged version from (id, path, tags, captions) documents; see KeywordWriter."""
    writer = KeywordWriter(staged, vocab, base)
    if delete_ids is not None and len(delete_ids):
        writer.delete(delete_ids)
    for doc in docs:
        writer.add(*doc)
    return writer.commit()


# --- the query side ------------------------------------------------------------------------------------
class TagStore:
    """tags.arrow and captions.arrow of a version, memory-mapped: tag chips and captions of result ids,
    the ids under tag: filters, and tag counts (facets)."""

    def __init__(self, folder: Path):
        tags = _read_arrow(folder / TAGS_FILE)
        caps = _read_arrow(folder / CAPTIONS_FILE)
        self.ids = tags.column("id").to_numpy()
        encoded = pc.dictionary_encode(tags.column("term")).combine_chunks()
        self.terms = np.asarray(encoded.dictionary.to_pylist(), dtype=object)
        self.codes = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int32)
        self.code_of = {t: i for i, t in enumerate(self.terms)}
        self.direct = tags.column("direct").to_numpy(zero_copy_only=False)
        self.score = tags.column("score").to_numpy(zero_copy_only=False)
        self.cap_ids = caps.column("id").to_numpy()
        self.captions = caps.column("caption")
        self.cap_score = caps.column("score").to_numpy(zero_copy_only=False)

    def ids_with(self, term: str) -> np.ndarray:
        """Sorted ids that carry `term` (a tag, one of its synonyms, or a parent)."""
        code = self.code_of.get(term.lower())
        if code is None:
            return np.zeros(0, np.int64)
        return np.unique(self.ids[self.codes == code])

    def best_for(self, term: str) -> tuple[np.ndarray, np.ndarray]:
        """Ids carrying `term`, best score first (browsing by tag)."""
        code = self.code_of.get(term.lower())
        if code is None:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        rows = np.flatnonzero(self.codes == code)
        order = np.argsort(-np.nan_to_num(self.score[rows], nan=-1.0), kind="stable")
        ids, first = np.unique(self.ids[rows[order]], return_index=True)
        keep = np.sort(first)
        return self.ids[rows[order]][keep], self.score[rows[order]][keep]

    def _rows(self, id_: int) -> slice:
        return slice(int(np.searchsorted(self.ids, id_, "left")), int(np.searchsorted(self.ids, id_, "right")))

    def tags_of(self, ids) -> list[list[str]]:
        out = []
        for i in np.asarray(ids, np.int64):
            s = self._rows(int(i))
            out.append([str(self.terms[c]) for c, d in zip(self.codes[s], self.direct[s]) if d])
        return out

    def details(self, id_: int) -> list[dict]:
        s = self._rows(int(id_))
        return [{"tag": str(self.terms[c]), "score": None if np.isnan(v) else round(float(v), 4)}
                for c, d, v in zip(self.codes[s], self.direct[s], self.score[s]) if d]

    def captions_of(self, ids) -> list[str | None]:
        ids = np.asarray(ids, np.int64)
        if not len(self.cap_ids):
            return [None] * len(ids)
        pos = np.clip(np.searchsorted(self.cap_ids, ids), 0, len(self.cap_ids) - 1)
        hit = self.cap_ids[pos] == ids
        return [self.captions[int(p)].as_py() if h else None for p, h in zip(pos, hit)]

    def counts(self, ids: np.ndarray | None = None, limit: int = 50) -> list[dict]:
        """Images per tag (direct tags only), most first, over all images or over `ids` (sorted)."""
        mask = self.direct.copy()
        if ids is not None:
            ids = np.asarray(ids, np.int64)
            if len(ids):
                pos = np.clip(np.searchsorted(ids, self.ids), 0, len(ids) - 1)
                mask &= ids[pos] == self.ids
            else:
                mask[:] = False
        n = np.bincount(self.codes[mask], minlength=len(self.terms))
        order = np.lexsort((self.terms.astype(str), -n))
        return [{"tag": str(self.terms[i]), "count": int(n[i])} for i in order[:limit] if n[i] > 0]


class KeywordIndex:
    """The BM25 side of a version: free words and quoted phrases over tags, captions and path words,
    with tag filters as must / must-not clauses."""

    def __init__(self, folder: Path):
        t = _tantivy()
        self.index = t.Index.open(str(folder / KEYWORD_DIR))
        self.schema = self.index.schema
        self.searcher = self.index.searcher()

    def _text_clause(self, free: list[str], phrases: list[list[str]]):
        t = _tantivy()
        should = []
        for w in free:
            for field in ("tags", "caption"):
                should.append(t.Query.term_query(self.schema, field, w))
            for pw in path_words(w):
                should.append(t.Query.term_query(self.schema, "path", pw))
        for words_ in phrases:
            per_field = []
            for field in TEXT_FIELDS:
                ws = [p for w in words_ for p in path_words(w)] if field == "path" else words_
                if len(ws) == 1:
                    per_field.append(t.Query.term_query(self.schema, field, ws[0]))
                elif ws:
                    per_field.append(t.Query.phrase_query(self.schema, field, ws))
            if per_field:  # a phrase must occur, in at least one field
                should.append(("must", t.Query.boolean_query([(t.Occur.Should, q) for q in per_field])))
        return should

    def search(self, free: list[str], phrases: list[list[str]], tags: list[str], not_tags: list[str], limit: int,
               allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) best first. `allowed`: sorted ids the results must be among (path filters)."""
        t = _tantivy()
        clauses = []
        shoulds = self._text_clause(free, phrases)
        plain = [q for q in shoulds if not isinstance(q, tuple)]
        clauses += [(t.Occur.Must, q[1]) for q in shoulds if isinstance(q, tuple)]
        if plain:
            clauses.append((t.Occur.Must, t.Query.boolean_query([(t.Occur.Should, q) for q in plain])))
        for tag in tags:
            clauses.append((t.Occur.Must, t.Query.const_score_query(t.Query.term_query(self.schema, "tag", tag.lower()),
                                                                     0.0)))
        for tag in not_tags:
            clauses.append((t.Occur.MustNot, t.Query.term_query(self.schema, "tag", tag.lower())))
        if allowed is not None:
            clauses.append((t.Occur.Must, t.Query.const_score_query(
                t.Query.term_set_query(self.schema, "id", [int(i) for i in allowed]), 0.0)))
        if not any(occ == t.Occur.Must for occ, _ in clauses):
            clauses.append((t.Occur.Must, t.Query.all_query()))
        query = t.Query.boolean_query(clauses)
        hits = self.searcher.search(query, limit=max(1, int(limit)), count=False).hits
        if not hits:
            return np.zeros(0, np.float32), np.zeros(0, np.int64)
        ids = np.asarray(self.searcher.fast_field_values("id", [h[1] for h in hits]), np.int64)
        return np.asarray([h[0] for h in hits], np.float32), ids

    @property
    def documents(self) -> int:
        return int(self.searcher.num_docs)
