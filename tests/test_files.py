"""lakelens.files: whole files or none, no temporary file left behind, sorted Arrow files."""

from __future__ import annotations

import pyarrow as pa
import pytest

from lakelens import files


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary_one(tmp_path):
    target = tmp_path / "CURRENT"
    files.write_text(target, "v0001\n")
    with pytest.raises(RuntimeError):
        with files.replacing(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("the writer died")
    assert target.read_text() == "v0001\n"
    files.write_bytes(target, b"v0002\n")
    assert target.read_bytes() == b"v0002\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["CURRENT"]


def test_writers_get_their_own_temporary_names_and_an_empty_block_replaces_nothing(tmp_path):
    target = tmp_path / "shard.faiss"
    with files.replacing(target) as a, files.replacing(target) as b:
        assert a != b and a.parent == b.parent == tmp_path
        a.write_text("a")
    assert target.read_text() == "a" and sorted(p.name for p in tmp_path.iterdir()) == ["shard.faiss"]


def test_sorted_arrow_files_are_sorted_by_id_in_one_batch_with_their_metadata(tmp_path):
    table = pa.table({"id": pa.array([3, 1, 2, 1], pa.int64()), "term": ["c", "a", "b", "z"]})
    path = tmp_path / "tags.arrow"
    files.write_sorted_arrow(path, table.replace_schema_metadata({"index_version": "v0003"}))
    reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))
    assert reader.num_record_batches == 1 and reader.schema.metadata == {b"index_version": b"v0003"}
    assert reader.read_all().to_pydict() == {"id": [1, 1, 2, 3], "term": ["a", "z", "b", "c"]}
    files.write_sorted_arrow(path, table.slice(0, 0))  # an empty table is a file too
    assert pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all().num_rows == 0
