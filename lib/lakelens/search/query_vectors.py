"""A query's vector: its text embedded with query arithmetic ("beach + sunset - people": the terms' unit
vectors, signed, summed, normalised), a query image embedded, and a text and an image combined with
weights. The Searcher and the batch query job (search/batch.py) embed queries with these functions."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from lakelens.errors import QueryError

QUERY_MAX_PIXELS = 16_000_000  # query images: a bound of their own, far below the embed job's
_OPERATOR = re.compile(r"(?:^|\s)([+-])\s+")


def parse_terms(text: str) -> list[tuple[int, str]]:
    """Query arithmetic: "beach + sunset - people" -> [(1, 'beach'), (1, 'sunset'), (-1, 'people')]. An
    operator is a + or - with spaces after it (and before it, unless it starts the query)."""
    if not isinstance(text, str) or not text.strip():
        raise QueryError("empty query text")
    trailing = re.search(r"(?:^|\s)([+-])$", text.strip())
    if trailing:
        raise QueryError(f"query arithmetic: nothing after {trailing.group(1)!r} in {text!r}")
    pieces = _OPERATOR.split(" " + text.strip())
    terms = []
    if pieces[0].strip():
        terms.append((1, pieces[0].strip()))
    for op, term in zip(pieces[1::2], pieces[2::2]):
        sign = 1 if op == "+" else -1
        if not term.strip():
            raise QueryError(f"query arithmetic: nothing after {op!r} in {text!r}")
        terms.append((sign, term.strip()))
    if not terms:
        raise QueryError(f"query arithmetic: no terms in {text!r}")
    if all(s < 0 for s, _ in terms):
        raise QueryError(f"query arithmetic: {text!r} only subtracts; give at least one term to add")
    return terms


def query_vector(embed_text, text: str) -> tuple[np.ndarray, list[str]]:
    """A text query's vector and notes, with query arithmetic; `embed_text(term) -> (vector, notes)`."""
    terms = parse_terms(text)
    if len(terms) == 1 and terms[0][0] > 0:
        return embed_text(terms[0][1])
    notes, total = [], None
    for sign, term in terms:
        vec, term_notes = embed_text(term)
        notes += term_notes
        vec = sign * vec / max(float(np.linalg.norm(vec)), 1e-12)
        total = vec if total is None else total + vec
    norm = float(np.linalg.norm(total))
    if norm < 1e-6:
        raise QueryError("the query's terms cancel out: nothing is left to search for")
    notes.append("query arithmetic: " + " ".join(f"{'+' if s > 0 else '-'}{t!r}" for s, t in terms))
    return (total / norm).astype(np.float32), notes


def check_weights(weights, n: int) -> list[float]:
    """Weights of a query's parts (text, image): finite, not negative, not all zero; default equal."""
    if weights is None:
        return [1.0] * n
    try:
        w = [float(x) for x in weights]
    except (TypeError, ValueError):
        raise QueryError(f"weights must be numbers, got {weights!r}") from None
    if len(w) != n or not all(np.isfinite(x) and x >= 0 for x in w) or not sum(w) > 0:
        raise QueryError(f"weights: give {n} finite numbers >= 0, not all zero (one per query part), got {weights!r}")
    return w


def combine(parts: list[np.ndarray], weights) -> tuple[np.ndarray, list[str]]:
    """The query vector of a text's and an image's vectors (either alone, or both): weights[0] x text +
    weights[1] x image, as unit vectors, normalised; and a note when both are there."""
    w = check_weights(weights, len(parts))
    total = sum(wi * p / max(float(np.linalg.norm(p)), 1e-12) for wi, p in zip(w, parts))
    norm = float(np.linalg.norm(total))
    if norm < 1e-6:
        raise QueryError("the weighted text and image cancel out: nothing is left to search for")
    notes = [f"text and image combined with weights {w[0]:g} and {w[1]:g}"] if len(parts) == 2 else []
    return (total / norm).astype(np.float32), notes


def embed_text(embedder_of, text: str) -> tuple[np.ndarray, list[str]]:
    """One text's vector, with a note when the model's context cuts it; `embedder_of()` gives the Embedder
    (asked for only once the text is usable: it checks the model's weights)."""
    if not isinstance(text, str) or not text.strip():
        raise QueryError("empty query text")
    notes = []
    embedder = embedder_of()
    tokenizer = embedder.loaded.tokenizer
    context = getattr(tokenizer, "context_length", None)
    encode = getattr(tokenizer, "encode", None)
    if context and encode is not None:
        n_tokens = len(encode(text.strip())) + 2  # start and end tokens
        if n_tokens > context:
            notes.append(f"query truncated to the model's {context} tokens (it has {n_tokens})")
    return embedder.embed_texts([text.strip()])[0], notes


def embed_image(embedder_of, image: str | Path | bytes) -> np.ndarray:
    """A query image's vector, from a path or its bytes; `embedder_of()` gives the Embedder."""
    if isinstance(image, (str, Path)):
        try:
            data = Path(image).read_bytes()
        except OSError as e:
            raise QueryError(f"cannot read query image {image}: {e.strerror or e}") from None
    elif isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
    else:
        raise QueryError(f"query image must be a path or bytes, not {type(image).__name__}")
    result = embedder_of()([data])[0]
    if result.error:
        raise QueryError(f"unusable query image: {result.error}")
    return result.embedding
