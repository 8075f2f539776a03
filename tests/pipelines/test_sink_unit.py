"""The sink's pieces called directly, without Ray: the write stage, fencing, resume and verification on hand-built Parquet."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.blocks import PRECISION, ROW, UNIT, precision_column
from pipelines.sink.lock import LockLostError, OutputLock
from pipelines.sink.parquet import ParquetSink
from pipelines.sink.records import COMMIT_KEY, checksum_file
from pipelines.sink.schema import ERROR_COLUMN, TRUNCATED_COLUMN
from pipelines.sink.units import plan_units
from pipelines.storage import InputError, list_parquet_files, locate

SCHEMA = pa.schema([("id", pa.string()), ("score", pa.float32()), (TRUNCATED_COLUMN, pa.bool_()), (ERROR_COLUMN, pa.string())])
PREC = {"name": "fp32", "reason": "test", "torch": "cpu", "ray_gpu_ids": []}


def scored_block(ids: list[str], rows: np.ndarray, unit: int) -> pa.Table:
    """What the inference actor hands the writer for one unit's rows."""
    n = len(ids)
    return pa.table({"id": ids, "score": pa.array(np.linspace(0, 1, n), pa.float32()), TRUNCATED_COLUMN: [False] * n,
                     ERROR_COLUMN: pa.nulls(n, pa.string()), UNIT: pa.array([unit] * n, pa.int32()), ROW: pa.array(rows),
                     PRECISION: precision_column(PREC, n)})


def local_checksums(paths):
    return [checksum_file(fs, path, "id") for fs, path in paths]


@pytest.fixture()
def planned(tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(10)], "text": ["t"] * 10}), inp / "a.parquet", row_group_size=5)
    loc = locate(str(inp))
    units, inputs = plan_units(loc, list_parquet_files(loc), 5)
    return units, inputs


def write_all(sink: ParquetSink, units, inputs, blocks):
    fn, kwargs = sink.write_stage(units, inputs, SCHEMA, None)
    return [fn(b, **kwargs) for b in blocks]


def test_write_stage_commits_one_file_per_unit_and_a_retry_replaces_it(tmp_path, planned):
    units, inputs = planned
    sink = ParquetSink(locate(str(tmp_path / "out")))
    with sink.open(overwrite=False):
        sink.resume(units, inputs)
        block = pa.concat_tables([scored_block([f"r{i}" for i in range(5)], np.arange(5), 0),
                                  scored_block([f"r{i}" for i in range(5, 10)], np.arange(5, 10), 1)])
        written = write_all(sink, units, inputs, [block, block])  # the second: a retried task
        assert [w.num_rows for w in written] == [2, 2]
        files = sorted((tmp_path / "out").glob("part-*.parquet"))
        assert len(files) == 2 and not list((tmp_path / "out" / "_mtcls" / "staging").iterdir())
        commit = json.loads(pq.read_schema(files[0]).metadata[COMMIT_KEY])
        assert commit["ranges"] in ([[0, 5]], [[5, 10]]) and commit["precision"] == [PREC]
        verification = sink.verify(inputs, local_checksums)
        assert verification.problems == [] and verification.rows_out == 10


def test_resume_marks_committed_rows_and_verify_finds_missing_ones(tmp_path, planned):
    units, inputs = planned
    sink = ParquetSink(locate(str(tmp_path / "out")))
    with sink.open(overwrite=False):
        sink.resume(units, inputs)
        write_all(sink, units, inputs, [scored_block(["r0", "r1", "r2"], np.arange(3), 0)])
    sink = ParquetSink(locate(str(tmp_path / "out")))
    with sink.open(overwrite=False):
        resume = sink.resume(units, inputs)
        assert len(resume.kept) == 1 and units[0].done == [[0, 3]] and units[0].pending_rows == 2 and units[1].done == []
        verification = sink.verify(inputs, local_checksums)
        assert [p.what for p in verification.problems] == ["7 of its 10 rows are not in the output"]


def test_a_writer_holding_a_stale_fence_moves_nothing_into_place(tmp_path, planned):
    units, inputs = planned
    out = locate(str(tmp_path / "out"))
    sink = ParquetSink(out)
    with sink.open(overwrite=False):
        sink.resume(units, inputs)
        fn, kwargs = sink.write_stage(units, inputs, SCHEMA, None)
    # The lease was released; another job holds it now.
    with OutputLock(out, timeout_s=30, heartbeat_s=5, owner={"run_id": "newer"}):
        with pytest.raises(LockLostError, match="run newer"):
            fn(scored_block(["r0"], np.arange(1), 0), **kwargs)
    assert not list((tmp_path / "out").glob("part-*.parquet"))
    assert not list((tmp_path / "out" / "_mtcls" / "staging").iterdir())


def test_driver_changes_are_fenced(tmp_path, planned):
    units, inputs = planned
    out = locate(str(tmp_path / "out"))
    sink = ParquetSink(out, lock_timeout_s=1.2)
    with sink.open(overwrite=False):
        sink.resume(units, inputs)
        write_all(sink, units, inputs, [scored_block(["r0", "r1"], np.arange(2), 0)])
        sink.lock._stop.set()  # the heartbeat stalls, as in a suspended process
        sink.lock._thread.join()
        import time

        time.sleep(1.5)
        with OutputLock(out, timeout_s=1.2, heartbeat_s=0.3, owner={"run_id": "thief"}):
            with pytest.raises(LockLostError):
                sink.remove([p.name for p in (tmp_path / "out").glob("part-*.parquet")])
            with pytest.raises(LockLostError):
                sink.finish({"status": "complete"}, None)
    assert len(list((tmp_path / "out").glob("part-*.parquet"))) == 1
    assert not (tmp_path / "out" / "_SUCCESS").exists() and not (tmp_path / "out" / "_manifest.json").exists()


def test_foreign_directory_is_refused_untouched(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("user data")
    with pytest.raises(InputError, match="not written by mtcls"):
        with ParquetSink(locate(str(tmp_path / "out"))).open(overwrite=False):
            pass
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["mine.txt"]


ID_TYPES = [pa.int8(), pa.int16(), pa.int32(), pa.int64(), pa.uint8(), pa.uint16(), pa.uint32(), pa.uint64(), pa.string(),
            pa.large_string(), pa.string_view(), pa.binary(), pa.large_binary(), pa.binary_view(), pa.binary(3)]


@pytest.mark.parametrize("id_type", ID_TYPES, ids=str)
def test_every_accepted_id_type_checksums_the_same_after_a_parquet_round_trip(tmp_path, id_type):
    """What verification does per file: the ids' checksum as written equals the one read back from
    storage, nulls counted; a lost, extra or repeated id changes it."""
    from pipelines.sink.records import id_type_ok, ids_checksum

    if pa.types.is_integer(id_type):
        top = 100 if id_type.bit_width == 8 else 2 ** (id_type.bit_width - 1) - 1
        values = [0, 1, top, top - 1, None] + ([-top, -1] if pa.types.is_signed_integer(id_type) else [7, 8])
    else:
        values = [b"abc", b"\xff\x00z", b"xyz", b"a\x00b", None, b"zzz", b"\x01\x02\x03"]
        if pa.types.is_string(id_type) or pa.types.is_large_string(id_type) or pa.types.is_string_view(id_type):
            values = ["abc", "é!z", "xyz", "a\x00b", None, "zzz", "日本x"]
    ids = pa.array(values, id_type)
    assert id_type_ok(id_type) and id_type_ok(pa.dictionary(pa.int32(), pa.string()))
    path = tmp_path / "ids.parquet"
    pq.write_table(pa.table({"id": ids}), path)
    back = checksum_file(locate(str(tmp_path)).fs, str(path), "id")
    assert (back.rows, back.checksum, back.nulls, back.duplicates) == (7, ids_checksum(ids), 1, 0)
    # Verification compares rows and checksum: a lost id, or one id in place of another, changes the checksum.
    assert ids_checksum(ids.slice(0, 6)) != back.checksum
    assert ids_checksum(pa.concat_arrays([ids.slice(0, 6), ids.slice(1, 1)])) != back.checksum
    repeated = checksum_file(locate(str(tmp_path)).fs, _written(tmp_path, pa.concat_arrays([ids, ids.slice(1, 1)])), "id")
    assert repeated.duplicates == 1 and repeated.rows == 8


def _written(tmp_path, ids) -> str:
    path = tmp_path / "more.parquet"
    pq.write_table(pa.table({"id": ids}), path)
    return str(path)
