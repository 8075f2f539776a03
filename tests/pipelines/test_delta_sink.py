"""The Delta Lake sink: exactly once through the table's log, under retries, other cuts, concurrent
writers without a lease, compaction and SIGKILL of the job at chosen moments."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytest.importorskip("deltalake")
from deltalake import DeltaTable  # noqa: E402

from pipelines.blocks import PRECISION, ROW, UNIT, precision_column  # noqa: E402
from pipelines.config import ConfigError  # noqa: E402
from pipelines.sink.delta import DATA_FILE, DeltaSink, TableReplacedError  # noqa: E402
from pipelines.sink.completion import completion_problems  # noqa: E402
from pipelines.sink.records import checksum_file, ids_checksum  # noqa: E402
from pipelines.sink.schema import ERROR_COLUMN, TRUNCATED_COLUMN  # noqa: E402
from pipelines.sink.units import plan_units  # noqa: E402
from pipelines.storage import InputError, list_parquet_files, locate  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = pa.schema([("id", pa.string()), ("score", pa.float32()), (TRUNCATED_COLUMN, pa.bool_()), (ERROR_COLUMN, pa.string())])
PREC = {"name": "fp32", "reason": "test", "torch": "cpu", "ray_gpu_ids": []}


def scored_block(rows: list[int], unit: int) -> pa.Table:
    """What the inference actor hands the writer: rows ``rows`` (file row numbers; ids ``r<row>``) of one unit."""
    n = len(rows)
    return pa.table({"id": [f"r{i}" for i in rows], "score": pa.array(np.linspace(0, 1, n), pa.float32()),
                     TRUNCATED_COLUMN: [False] * n, ERROR_COLUMN: pa.nulls(n, pa.string()),
                     UNIT: pa.array([unit] * n, pa.int32()), ROW: pa.array(rows, pa.int64()), PRECISION: precision_column(PREC, n)})


def local_checksums(paths):
    return [checksum_file(fs, path, "id") for fs, path in paths]


def table_ids(out: Path) -> list[str]:
    return DeltaTable(str(out)).to_pyarrow_table(columns=["id"]).column("id").to_pylist()


@pytest.fixture()
def planned(tmp_path):
    """One input file of 10 rows (ids r0..r9) in two units of 5."""
    inp = tmp_path / "in"
    inp.mkdir()
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(10)], "text": ["t"] * 10}), inp / "a.parquet", row_group_size=5)
    loc = locate(str(inp))
    return plan_units(loc, list_parquet_files(loc), 5)


def write(sink: DeltaSink, units, inputs, *cuts: list[int]) -> pa.Table:
    """Runs the write stage on one block per cut (a cut: row numbers of one unit)."""
    fn, kwargs = sink.write_stage(units, inputs, SCHEMA, None)
    return pa.concat_tables([fn(scored_block(rows, rows[0] // 5), **kwargs) for rows in cuts])


def test_retries_other_cuts_and_concurrent_writers_commit_each_row_once(tmp_path, planned):
    units, inputs = planned
    out = tmp_path / "out"
    a, b = DeltaSink(locate(str(out)), SCHEMA, lock=False), DeltaSink(locate(str(out)), SCHEMA, lock=False)
    with a.open(overwrite=False, inputs=inputs), b.open(overwrite=False, inputs=inputs):
        a.resume(units, inputs)
        written_b = write(b, units, inputs, [0, 1, 2])
        written_a = write(a, units, inputs, [0, 1, 2, 3, 4])
        assert {r["file"] for r in b.commit(written_b).to_pylist()} == set(written_b.column("file").to_pylist())
        # A's file shares rows 0-2 with B's committed one: A commits a cut of its file holding rows 3-4 only.
        committed = a.commit(written_a).to_pylist()
        assert [json.loads(r["record"])["ranges"] for r in committed] == [[[3, 5]]] and committed[0]["rows"] == 2
        assert sorted(table_ids(out)) == [f"r{i}" for i in range(5)]
        version = DeltaTable(str(out)).version()
        assert a.commit(written_a).num_rows == 0 and b.commit(written_b).num_rows == 0  # retried commits add nothing
        assert DeltaTable(str(out)).version() == version
        assert not (out / written_a.column("file")[0].as_py()).exists()  # the uncut file was deleted, never committed

        # Both writers score unit 1, cut differently, and commit at the same moment, several times over.
        cuts = {a: ([5, 6], [7, 8, 9]), b: ([5, 6, 7], [8, 9])}
        written = {s: write(s, units, inputs, *c) for s, c in cuts.items()}
        start = threading.Barrier(2)
        errors = []

        def commit_all(sink):
            try:
                start.wait()
                for _ in range(3):
                    for k in range(written[sink].num_rows):
                        sink.commit(written[sink].slice(k, 1))
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=commit_all, args=(s,)) for s in cuts]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        ids = table_ids(out)
        assert sorted(ids) == [f"r{i}" for i in range(10)] and len(set(ids)) == 10
        verification = a.verify(inputs, local_checksums)
        assert verification.problems == [] and verification.rows_out == 10 and verification.duplicates_removed == []
        # Every data file in the directory is either in the table or an uncommitted leftover of a cut.
        current = set(a.current_files(DeltaTable(str(out))))
        assert current <= {p.name for p in out.glob("part-*.parquet")}


def test_compaction_keeps_resume_and_verification(tmp_path, planned):
    units, inputs = planned
    out = tmp_path / "out"
    sink = DeltaSink(locate(str(out)), SCHEMA)
    with sink.open(overwrite=False, inputs=inputs):
        sink.resume(units, inputs)
        sink.commit(write(sink, units, inputs, [0, 1, 2, 3, 4], [5, 6, 7]))
        first = sink.verify(inputs, local_checksums)
    assert [p.what for p in first.problems] == ["2 of its 10 rows are not in the output"]
    DeltaTable(str(out)).optimize.compact()
    assert len(DeltaTable(str(out)).file_uris()) == 1  # one rewritten file, no footer records left
    sink = DeltaSink(locate(str(out)), SCHEMA)
    with sink.open(overwrite=False, inputs=inputs):
        sink.resume(units, inputs)
        assert units[0].pending_rows == 0 and units[1].done == [[5, 8]]
        sink.commit(write(sink, units, inputs, [8, 9]))
        verification = sink.verify(inputs, local_checksums)
        assert verification.problems == [] and verification.rows_out == 10
        sink.finish({"status": "complete", "model": {"weights_sha256": "x"}, "rows_out": 10, "rows_in": 10}, verification)
    conf = DeltaTable(str(out)).metadata().configuration
    assert conf["mtcls.status"] == "complete" and conf["mtcls.rows"] == "10"
    assert conf["mtcls.ids_checksum"] == str(ids_checksum(pa.array([f"r{i}" for i in range(10)])))
    assert json.loads((out / "_mtcls" / "manifest.json").read_text())["status"] == "complete"


def test_changed_input_is_removed_in_one_commit_and_rescored(tmp_path, planned):
    units, inputs = planned
    out = tmp_path / "out"
    sink = DeltaSink(locate(str(out)), SCHEMA)
    with sink.open(overwrite=False):
        sink.resume(units, inputs)
        sink.commit(write(sink, units, inputs, [0, 1, 2, 3, 4], [5, 6, 7, 8, 9]))
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(10)], "text": ["changed"] * 10}), tmp_path / "in" / "a.parquet",
                   row_group_size=5)
    loc = locate(str(tmp_path / "in"))
    units, inputs = plan_units(loc, list_parquet_files(loc), 5)
    sink = DeltaSink(locate(str(out)), SCHEMA)
    with sink.open(overwrite=False):
        version = DeltaTable(str(out)).version()
        resume = sink.resume(units, inputs)
        assert len(resume.stale) == 2 and all(u.pending_rows == 5 for u in units)
        assert DeltaTable(str(out)).version() == version + 1 and table_ids(out) == []
        assert DeltaTable(str(out)).history(1)[0]["mtcls.removed"] == "stale"


def test_orphans_older_than_the_lease_are_removed_and_nothing_else(tmp_path, planned):
    units, inputs = planned
    out = tmp_path / "out"
    sink = DeltaSink(locate(str(out)), SCHEMA, lock_timeout_s=60)
    with sink.open(overwrite=False):
        sink.resume(units, inputs)
        committed = sink.commit(write(sink, units, inputs, [0, 1, 2, 3, 4])).column("file").to_pylist()
        orphans = write(sink, units, inputs, [5, 6, 7], [8, 9]).column("file").to_pylist()  # a killed job's files
    DeltaTable(str(out)).optimize.compact()  # the committed file is now only in the history (time travel)
    old = time.time() - 3600
    for name in committed + orphans[:1]:
        os.utime(out / name, (old, old))
    sink = DeltaSink(locate(str(out)), SCHEMA, lock_timeout_s=60)
    with sink.open(overwrite=False):
        pass
    assert all(DATA_FILE.match(n) for n in committed + orphans)
    assert (out / committed[0]).exists()  # tombstoned, still read by older versions
    assert not (out / orphans[0]).exists() and (out / orphans[1]).exists()  # the young one may be a live job's
    assert DeltaTable(str(out), version=1).to_pyarrow_table().num_rows == 5


def test_foreign_outputs_are_refused_and_a_replaced_table_stops_its_writers(tmp_path, planned):
    units, inputs = planned
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not a Delta table written by mtcls"):
        with DeltaSink(locate(str(tmp_path / "user")), SCHEMA).open(overwrite=False):
            pass
    (tmp_path / "pq" / "_mtcls").mkdir(parents=True)
    (tmp_path / "pq" / "part-x.parquet").write_bytes(b"")
    with pytest.raises(InputError, match="Parquet output"):
        with DeltaSink(locate(str(tmp_path / "pq")), SCHEMA).open(overwrite=False):
            pass
    DeltaTable.create(str(tmp_path / "theirs"), SCHEMA)
    with pytest.raises(InputError, match="Delta table that mtcls did not write"):
        with DeltaSink(locate(str(tmp_path / "theirs")), SCHEMA).open(overwrite=False):
            pass
    other = pa.schema([("id", pa.string()), ("other", pa.int64()), (TRUNCATED_COLUMN, pa.bool_()), (ERROR_COLUMN, pa.string())])
    out = tmp_path / "out"
    first = DeltaSink(locate(str(out)), SCHEMA, lock=False)
    with first.open(overwrite=False):
        first.resume(units, inputs)
        written = write(first, units, inputs, [0, 1, 2, 3, 4])
        with pytest.raises(InputError, match="other columns"):
            with DeltaSink(locate(str(out)), other, lock=False).open(overwrite=False):
                pass
        with DeltaSink(locate(str(out)), other, lock=False).open(overwrite=True):
            pass
        with pytest.raises(TableReplacedError):
            first.commit(written)
    assert table_ids(out) == []


def test_on_s3_commits_are_conditional_and_a_store_without_them_is_refused(tmp_path, planned, monkeypatch):
    """moto's S3 honours If-None-Match: the sink commits there exactly once, and a writer whose table
    moved behind it is refused by the store, not allowed to overwrite a log entry. A store that ignores
    the condition (as some S3-compatible stores do) is refused before anything is written."""
    import s3fs
    from deltalake import write_deltalake

    from pipelines.storage import delta_storage_options
    from tests.conftest import moto_s3

    units, inputs = planned
    with moto_s3(own_process=True):
        s3fs.S3FileSystem().mkdir("bkt")
        loc = locate("s3://bkt/scores")
        options = {**delta_storage_options(loc), "AWS_ENDPOINT_URL": os.environ["AWS_ENDPOINT_URL"]}
        sink = DeltaSink(loc, SCHEMA, lock=False, storage_options=options)
        with sink.open(overwrite=False, inputs=inputs):
            sink.resume(units, inputs)
            written = write(sink, units, inputs, [0, 1, 2, 3, 4], [5, 6, 7, 8, 9])
            assert sink.commit(written).num_rows == 2 and sink.commit(written).num_rows == 0
            assert sink.verify(inputs, local_checksums).problems == []
        dt = DeltaTable(loc.uri(), storage_options=options)
        assert sorted(dt.to_pyarrow_table(columns=["id"]).column("id").to_pylist()) == sorted(f"r{i}" for i in range(10))
        assert not [p for p in s3fs.S3FileSystem().find("bkt/scores/_mtcls") if "probe-" in p]
        # A writer holding an older version cannot write over the log entry another writer made.
        stale = DeltaTable(loc.uri(), storage_options=options)
        write_deltalake(loc.uri(), pa.table({"id": ["x"], "score": pa.array([0.5], pa.float32()), TRUNCATED_COLUMN: [False],
                                             ERROR_COLUMN: pa.nulls(1, pa.string())}), mode="append", storage_options=options)
        from deltalake.exceptions import CommitFailedError
        from deltalake.transaction import CommitProperties

        with pytest.raises(CommitFailedError):
            write_deltalake(stale, pa.table({"id": ["y"], "score": pa.array([0.5], pa.float32()), TRUNCATED_COLUMN: [False],
                                             ERROR_COLUMN: pa.nulls(1, pa.string())}), mode="append",
                            commit_properties=CommitProperties(max_commit_retries=0), storage_options=options)

        # A store that ignores If-None-Match: every write lands, overwriting.
        other_loc = locate("s3://bkt/other")
        original = other_loc.fs.call_s3

        def unconditional(method, *args, IfNoneMatch=None, **kw):  # noqa: N803 - boto3's parameter name
            return original(method, *args, **kw)

        monkeypatch.setattr(other_loc.fs, "call_s3", unconditional)
        other = DeltaSink(other_loc, SCHEMA, lock=False, storage_options=options)
        with pytest.raises(InputError, match="ignored a conditional write"):
            with other.open(overwrite=False, inputs=inputs):
                pass
        assert not s3fs.S3FileSystem().exists("bkt/other/_delta_log")


def test_config_keys_fail_before_any_work_naming_the_key():
    from pipelines.score import ScoreConfig

    with pytest.raises(ConfigError, match="key 'output_format'"):
        ScoreConfig(output_format="iceberg")
    with pytest.raises(ConfigError, match="key 'lock'"):
        ScoreConfig(lock=False)
    with pytest.raises(ConfigError, match="key 'embedding_dtype'"):
        ScoreConfig(output_format="delta", embeddings=True, embedding_dtype="float16")
    with pytest.raises(ConfigError, match="key 'commit_every_files'"):
        ScoreConfig(output_format="delta", commit_every_files=0)
    cfg = ScoreConfig(output_format="delta", lock=False)
    assert (cfg.commit_every_files, cfg.commit_every_s) == (20, 30.0)


# --- the job -------------------------------------------------------------------------------------


def test_scoring_into_delta_then_rerun_and_compaction_are_no_ops(tmp_path, tiny_model_dir, ray_local):
    from pipelines.score import ScoreConfig, run_score

    ids = write_inputs(tmp_path / "in", files=2, rows=150)
    out = tmp_path / "out"
    cfg = ScoreConfig(input=str(tmp_path / "in"), output=str(out), model=str(tiny_model_dir), progress=False, rows_per_file=50,
                      block_rows=50, num_actors=1, output_format="delta", commit_every_files=2)
    manifest = run_score(cfg)
    dt = DeltaTable(str(out))
    read = dt.to_pyarrow_table()
    assert sorted(read.column("id").to_pylist()) == sorted(ids) and manifest["status"] == "complete"
    assert manifest["rows_scored_this_run"] == len(ids) == manifest["rows_out"]
    conf = dt.metadata().configuration
    heads = {h["name"]: h for h in json.loads(conf["mtcls.heads"])}
    assert heads["type"]["labels"] == ["news", "opinion", "ad"] and conf["mtcls.status"] == "complete"
    assert json.loads(conf["mtcls.model"])["weights_sha256"] == manifest["model"]["weights_sha256"]
    assert conf["mtcls.manifest"].endswith("_mtcls/manifest.json") and (out / "_mtcls" / "manifest.json").exists()
    writes = [h for h in dt.history() if h.get("operation") == "WRITE"]
    assert 2 <= len(writes) <= 6 and all("mtcls.keys" in h for h in writes)  # 6 files, committed in batches
    checksum = conf["mtcls.ids_checksum"]

    assert run_score(cfg)["rows_scored_this_run"] == 0
    DeltaTable(str(out)).optimize.compact()
    again = run_score(cfg)
    dt = DeltaTable(str(out))
    assert again["rows_scored_this_run"] == 0 and again["status"] == "complete" and again["rows_out"] == len(ids)
    assert len(dt.file_uris()) == 1 and dt.metadata().configuration["mtcls.ids_checksum"] == checksum
    assert sorted(dt.to_pyarrow_table(columns=["id"]).column("id").to_pylist()) == sorted(ids)

    # Evaluation reads it as a table: complete by its status property, the files of the latest version,
    # the heads from the table's properties (the compacted file's footer has none).
    from pipelines.evaluate.run import specs_from_predictions
    from pipelines.sources import resolve_input

    loc = locate(str(out))
    assert completion_problems(loc) == [] and len(resolve_input(loc).files) == 1 < len(list(out.glob("part-*.parquet")))
    assert b"mtcls" not in (pq.read_schema(resolve_input(loc).files[0]).metadata or {})
    specs, identity = specs_from_predictions(str(out))
    assert [s.name for s in specs] == list(heads) and identity["weights_sha256"] == manifest["model"]["weights_sha256"]

    # Other engines read the same rows: polars, and DuckDB's delta_scan (the extension from its pip package).
    import duckdb
    import duckdb_extension_delta
    import polars as pl

    assert sorted(pl.read_delta(str(out)).get_column("id").to_list()) == sorted(ids)
    extension = Path(duckdb_extension_delta.__file__).parent / "extensions" / f"v{duckdb.__version__}" / "delta.duckdb_extension"
    con = duckdb.connect()
    con.execute(f"LOAD '{extension}'")
    assert sorted(r[0] for r in con.execute(f"SELECT id FROM delta_scan('{out}')").fetchall()) == sorted(ids)


def write_inputs(path: Path, files: int, rows: int) -> list[str]:
    path.mkdir(parents=True)
    ids = []
    for k in range(files):
        names = [f"f{k:03d}-{i:05d}" for i in range(rows)]
        texts = [f"review {i} of batch {k}: " + "words " * (i % 30) for i in range(rows)]
        pq.write_table(pa.table({"id": names, "text": texts}), path / f"part-{k:03d}.parquet", row_group_size=50)
        ids += names
    return ids


#: Runs jobs.score, SIGKILLing its own driver at a chosen moment of the Delta commit (``MTCLS_TEST_KILL``):
#: ``record:<n>`` right after the n-th commit's record file is written, before its log entry;
#: ``committed:<n>`` right after the n-th commit is in the log, before the driver goes on.
KILLING_JOB = """
import os, signal, sys
from pipelines.sink import delta
where, n = os.environ["MTCLS_TEST_KILL"].split(":")
calls = []
def at(name):
    original = getattr(delta.DeltaSink, name)
    def patched(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        if name != "_write_record_file" or "added" in args[0]:
            calls.append(1)
            if len(calls) == int(n):
                os.kill(os.getpid(), signal.SIGKILL)
        return result
    setattr(delta.DeltaSink, name, patched)
at({"record": "_write_record_file", "committed": "_commit_records"}[where])
from jobs.score import main
from pipelines.runtime import run_job
run_job(main)
"""


def score_cmd(inp: Path, out: Path, model: Path, *extra: str, kill: str = "") -> list[str]:
    job = ["-c", KILLING_JOB] if kill else ["-m", "jobs.score"]
    return [sys.executable, *job, f"input={inp}", f"output={out}", f"model={model}", "progress=false", "output_format=delta",
            "rows_per_file=100", "block_rows=50", "max_tokens_per_batch=64", "num_actors=1", "commit_every_files=1", *extra]


def signal_marked(marker: str, sig: int) -> None:
    """Sends ``sig`` to every process whose environment carries the marker (a driver and the Ray it started)."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            if marker.encode() in Path(f"/proc/{pid}/environ").read_bytes():
                os.kill(int(pid), sig)
        except (OSError, ProcessLookupError):
            continue


@pytest.mark.slow
def test_sigkill_inside_commits_then_rerun_leaves_each_id_once(tmp_path, tiny_model_dir):
    ids = write_inputs(tmp_path / "in", files=2, rows=300)
    out = tmp_path / "out"
    for kill in ("record:2", "committed:3"):
        marker = f"MTCLS_TEST_{uuid.uuid4().hex}"
        env = {**os.environ, "RAY_AUTH_MODE": "disabled", marker: "1", "MTCLS_TEST_KILL": kill, "PYTHONPATH": str(ROOT)}
        job = subprocess.run(score_cmd(tmp_path / "in", out, tiny_model_dir, kill=kill), cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=600)
        signal_marked(marker, signal.SIGKILL)  # the Ray the killed driver started
        assert job.returncode == -signal.SIGKILL, job.stderr[-3000:]
        seen = table_ids(out)
        assert len(seen) == len(set(seen)) and 0 < len(seen) < len(ids), kill
        assert DeltaTable(str(out)).metadata().configuration["mtcls.status"] == "incomplete"
        assert completion_problems(locate(str(out))) == ['its table property mtcls.status is "incomplete"']
    at_kill = len(seen)
    rerun = subprocess.run(score_cmd(tmp_path / "in", out, tiny_model_dir), cwd=ROOT, env={**os.environ, "RAY_AUTH_MODE": "disabled"},
                           capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "its process is gone" in rerun.stderr  # the killed driver's lease, taken over at once
    seen = table_ids(out)
    assert sorted(seen) == sorted(ids)
    manifest = json.loads((out / "_mtcls" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["rows_scored_this_run"] == len(ids) - at_kill
    # Data files of the killed runs that no version references stay on disk, out of the table, until
    # they are older than the lease timeout.
    referenced = set(DeltaTable(str(out)).get_add_actions(flatten=True).column("path").to_pylist())
    assert referenced < {p.name for p in out.glob("part-*.parquet")}


@pytest.mark.slow
def test_two_concurrent_jobs_without_lock_commit_each_id_once(tmp_path, tiny_model_dir):
    ids = write_inputs(tmp_path / "in", files=2, rows=300)
    out = tmp_path / "out"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    jobs = [subprocess.Popen(score_cmd(tmp_path / "in", out, tiny_model_dir, "lock=false"), cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [job.communicate(timeout=600) for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0], [err[-3000:] for _, err in results]
    seen = table_ids(out)
    assert sorted(seen) == sorted(ids)
    scored = [json.loads(stdout[stdout.index("{"):])["rows_scored_this_run"] for stdout, _ in results]
    assert sum(scored) == len(ids)  # each row committed by exactly one of the two jobs
    assert "lock" not in {p.name.split(".")[0] for p in (out / "_mtcls").iterdir()}
