import threading

import numpy as np
from conftest import encode, noise_image

from lakelens import Embedder, ModelSpec


def test_embedder_returns_unit_vectors_and_errors_as_values():
    emb = Embedder(ModelSpec("lakelens-tiny"), batch_size=4)
    contents = [encode(noise_image(i), "PNG") for i in range(5)] + [b"", b"nope"]
    out = emb(contents)
    assert [r.error for r in out] == [None] * 5 + ["empty file", "not an image"]
    vecs = np.stack([r.embedding for r in out[:5]])
    assert vecs.shape == (5, 128) and vecs.dtype == np.float32
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1, atol=1e-5)
    assert out[0].width == 80 and out[0].height == 60
    assert len({v.tobytes() for v in vecs}) == 5  # different images, different vectors


def test_batch_size_and_threads_do_not_change_results():
    contents = [encode(noise_image(i), "JPEG") for i in range(7)]
    a = Embedder(ModelSpec("lakelens-tiny"), batch_size=1, decode_threads=1)(contents)
    b = Embedder(ModelSpec("lakelens-tiny"), batch_size=3, decode_threads=4)(contents)
    assert max(np.abs(x.embedding - y.embedding).max() for x, y in zip(a, b)) < 1e-5


def test_text_embeddings_are_unit_vectors():
    t = Embedder(ModelSpec("lakelens-tiny")).embed_texts(["a red circle", "a blue square"])
    assert t.shape == (2, 128) and np.allclose(np.linalg.norm(t, axis=1), 1, atol=1e-5)


class Recording:
    """The Embedder's real engine, with its image calls logged in `events`. Embedding batch b does not end
    until a decode of batch b + 1 has begun (or 30 s passed, where nothing overlaps): an overlapping
    stream shows it in the log's order, whatever the machine's speed."""

    def __init__(self, engine, events, next_started):
        self.engine, self.events, self.next_started, self.calls = engine, events, next_started, 0

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def encode_image(self, x):
        batch, self.calls = self.calls, self.calls + 1  # one call a batch: 4 images or fewer, batch_size 4
        if batch + 1 in self.next_started:
            self.next_started[batch + 1].wait(30)
        out = self.engine.encode_image(x)
        self.events.append(("embedded", batch))
        return out


def test_stream_overlaps_batches_and_keeps_order():
    emb = Embedder(ModelSpec("lakelens-tiny"), batch_size=4, decode_threads=2)
    batches = [[encode(noise_image(10 * b + i), "JPEG") for i in range(3)] + ([b""] if b == 1 else [])
               for b in range(3)]
    batch_of = {c: b for b, contents in enumerate(batches) for c in contents}
    events, started = [], {b: threading.Event() for b in range(3)}
    prepare = emb._prepare

    def recording_prepare(data):
        events.append(("decoding", batch_of[data]))
        started[batch_of[data]].set()
        return prepare(data)

    emb._prepare = recording_prepare
    emb.engine = Recording(emb.engine, events, started)
    streamed = list(emb.stream((f"batch{b}", c) for b, c in enumerate(batches)))
    # batch b + 1 was decoding before batch b's embedding ended
    for b in (0, 1):
        assert events.index(("decoding", b + 1)) < events.index(("embedded", b)), events
    assert [tag for tag, _ in streamed] == ["batch0", "batch1", "batch2"]
    for (_, got), contents in zip(streamed, batches):
        want = emb(contents)
        assert [r.error for r in got] == [r.error for r in want]
        assert all(r.embedding is None if w.embedding is None else np.array_equal(r.embedding, w.embedding)
                   for r, w in zip(got, want))
    assert streamed[1][1][3].error == "empty file"
