"""Operator mistakes and odd inputs never lose data: paths apart, inputs known by content, ids of every type, odd text."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.config import ConfigError
from pipelines.score import ScoreConfig, run_score
from pipelines.storage import InputError


def cfg(inp, out, model, **kw) -> ScoreConfig:
    return ScoreConfig(input=str(inp), output=str(out), model=str(model), progress=False, precision="fp32", profile=False, **kw)


def score(config: ScoreConfig) -> dict:
    """The scoring job run in this process without Ray: these tests are about the sink and the checks around it."""
    return run_score(config, inline=True)


def write(path: Path, ids, texts=None, **kw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    texts = texts if texts is not None else [f"text of row {i}" for i in range(len(ids))]
    pq.write_table(pa.table({"id": ids, "text": texts}), path, **kw)


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --- the output is never on, above or inside the input ---------------------------------------------


@pytest.mark.parametrize("spelling", ["same", "dotdot", "symlink", "file_uri", "relative", "inside", "around"])
def test_output_overlapping_the_input_is_refused_before_any_work(tmp_path, tiny_model_dir, spelling, monkeypatch):
    inp = tmp_path / "data" / "emb"
    write(inp / "part-0.parquet", [f"r{i}" for i in range(5)])
    (inp / "notes.txt").write_text("the user's own file")
    before = snapshot(tmp_path / "data")
    (tmp_path / "runs" / "x").mkdir(parents=True)
    os.symlink(inp, tmp_path / "link")
    monkeypatch.chdir(tmp_path)
    out = {"same": inp, "dotdot": tmp_path / "runs" / "x" / ".." / ".." / "data" / "emb", "symlink": tmp_path / "link",
           "file_uri": f"file://{inp}", "relative": "data/emb", "inside": inp / "_scores", "around": tmp_path / "data"}[spelling]
    with pytest.raises(ConfigError, match="key 'output'.*the input"):
        score(cfg(inp, out, tiny_model_dir, overwrite=True))
    assert snapshot(tmp_path / "data") == before


# --- inputs are known by content, not spelling or mtime ---------------------------------------------


def test_rewrite_keeping_size_and_mtime_is_rescored(tmp_path, tiny_model_dir):
    inp, out = tmp_path / "in", tmp_path / "out"
    write(inp / "a.parquet", [f"a{i}" for i in range(40)])
    write(inp / "b.parquet", [f"b{i}" for i in range(40)])
    first = score(cfg(inp, out, tiny_model_dir))
    assert first["status"] == "complete"
    stat = os.stat(inp / "a.parquet")
    size = stat.st_size
    write(inp / "a.parquet", [f"a{i}" for i in range(40)], texts=[f"TEXT OF ROW {i}" for i in range(40)])
    assert os.stat(inp / "a.parquet").st_size == size  # same length of text: same size
    os.utime(inp / "a.parquet", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    second = score(cfg(inp, out, tiny_model_dir))
    assert second["rows_scored_this_run"] == 40 and second["verification"]["stale_files_removed"]
    table = pd.read_parquet(out)
    assert len(table) == 80 and table["id"].is_unique
    # a touch changes the mtime only: nothing to rescore
    os.utime(inp / "b.parquet")
    assert score(cfg(inp, out, tiny_model_dir))["rows_scored_this_run"] == 0


def test_one_input_through_two_spellings_is_one_input(tmp_path, tiny_model_dir):
    inp, out = tmp_path / "in", tmp_path / "out"
    write(inp / "a.parquet", [f"a{i}" for i in range(30)])
    score(cfg(inp, out, tiny_model_dir))
    os.symlink(inp, tmp_path / "alias")
    again = score(cfg(tmp_path / "alias", out, tiny_model_dir))
    assert again["rows_scored_this_run"] == 0 and again["status"] == "complete"
    again = score(cfg(f"file://{tmp_path}/x/../in", out, tiny_model_dir))
    assert again["rows_scored_this_run"] == 0


def test_rerun_on_fewer_input_files_is_refused_and_keeps_committed_rows(tmp_path, tiny_model_dir):
    inp, out = tmp_path / "in", tmp_path / "out"
    write(inp / "a.parquet", [f"a{i}" for i in range(30)])
    write(inp / "b.parquet", [f"b{i}" for i in range(30)])
    score(cfg(inp, out, tiny_model_dir))
    before = snapshot(out)
    with pytest.raises(InputError, match=r"(?s)30 committed rows of 1 input file.*b\.parquet.*prune_missing=true"):
        score(cfg(inp / "a.parquet", out, tiny_model_dir))
    assert snapshot(out) == before
    pruned = score(cfg(inp / "a.parquet", out, tiny_model_dir, prune_missing=True))
    assert pruned["status"] == "complete" and set(pd.read_parquet(out)["id"]) == {f"a{i}" for i in range(30)}


# --- ids --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ids", [
    pa.array([*range(20), None], pa.int64()),
    pa.array([*range(20), None], pa.uint16()),
    pa.array([f"r{i}" for i in range(20)] + [None], pa.large_string()),
    pa.array([f"r{i}".encode() for i in range(20)] + [None], pa.binary()),
    pa.array([f"r{i}" for i in range(20)] + [None]).dictionary_encode(),
], ids=["int64", "uint16", "large_string", "binary", "dictionary"])
def test_every_integer_string_and_binary_id_type_verifies_with_nulls(tmp_path, tiny_model_dir, ids):
    inp, out = tmp_path / "in.parquet", tmp_path / "out"
    pq.write_table(pa.table({"id": ids, "text": [f"row {i}" for i in range(len(ids))]}), inp)
    manifest = score(cfg(inp, out, tiny_model_dir))
    assert manifest["status"] == "complete" and (out / "_SUCCESS").exists()
    assert manifest["ids"] == {"null": 1, "duplicate_within_file": 0}


def test_duplicate_ids_are_counted(tmp_path, tiny_model_dir):
    inp = tmp_path / "in.parquet"
    write(inp, ["a", "b", "a", "c", "a"])
    manifest = score(cfg(inp, tmp_path / "out", tiny_model_dir))
    assert manifest["status"] == "complete" and manifest["ids"]["duplicate_within_file"] == 2


@pytest.mark.parametrize("ids", [pa.array([0.5, 1.5]), pa.array([[1], [2]]), pa.array([{"a": 1}, {"a": 2}]), pa.array([True, False])],
                         ids=["float", "list", "struct", "bool"])
def test_id_type_that_cannot_identify_rows_fails_before_any_work(tmp_path, tiny_model_dir, ids):
    inp, out = tmp_path / "in.parquet", tmp_path / "out"
    pq.write_table(pa.table({"id": ids, "text": ["x", "y"]}), inp)
    with pytest.raises(InputError, match=f"id column 'id' is {str(ids.type).split('<')[0]}.*cannot identify rows"):
        score(cfg(inp, out, tiny_model_dir))
    assert not out.exists()


# --- text and limits --------------------------------------------------------------------------------


def test_invalid_utf8_and_huge_cells_are_per_row_outcomes(tmp_path, tiny_model_dir):
    inp, out = tmp_path / "in.parquet", tmp_path / "out"
    raw = [b"fine text", b"bad \xff\xfe bytes", ("word " * 2_000_000).encode(), b"also fine"]
    texts = pa.array(raw, pa.binary()).view(pa.string())  # a string column holding invalid UTF-8, as a buggy writer leaves it
    pq.write_table(pa.table({"id": ["ok", "bad", "huge", "ok2"], "text": texts}), inp)
    manifest = score(cfg(inp, out, tiny_model_dir))
    table = pd.read_parquet(out).set_index("id")
    assert manifest["status"] == "complete" and len(table) == 4
    assert "invalid UTF-8" in table.loc["bad", "error"]
    assert table["error"].drop("bad").isna().all()
    assert bool(table.loc["huge", "truncated"]) and not bool(table.loc["ok", "truncated"])


def test_max_length_beyond_the_encoders_positions_fails_before_any_work(tmp_path, tiny_model_dir, tiny_encoder_dir):
    inp, out = tmp_path / "in.parquet", tmp_path / "out"
    write(inp, ["a"])
    with pytest.raises(ConfigError, match=r"key 'max_length': 200 tokens is more than the encoder's position embeddings allow \(160\)"):
        score(cfg(inp, out, tiny_model_dir, max_length=200))
    assert not out.exists()
    # Evaluation and training check the same limit before any work (no Ray is started for it).
    from pipelines.evaluate import EvalConfig, run_evaluate
    from pipelines.train import TrainConfig, run_train

    report = tmp_path / "report"
    with pytest.raises(ConfigError, match=r"key 'max_length': 200 tokens .* allow \(160\)"):
        run_evaluate(EvalConfig(data=str(inp), model=str(tiny_model_dir), output=str(report), max_length=200))
    with pytest.raises(ConfigError, match=r"key 'max_length \(0: the model's max_seq_length\)': 512 tokens .* \(160\)"):
        score(cfg(inp, out, _with_max_seq_length(tiny_model_dir, tmp_path / "long", 512)))
    model_out = tmp_path / "model"
    with pytest.raises(ConfigError, match=r"key 'max_length': 161 tokens .* allow \(160\)"):
        run_train(TrainConfig(train=[str(inp)], encoder=str(tiny_encoder_dir), output=str(model_out), max_length=161,
                              heads=[{"name": "spam", "kind": "binary", "labels": ["no", "yes"]}]))
    assert not report.exists() and not model_out.exists() and not out.exists()


def _with_max_seq_length(model_dir: Path, target: Path, length: int) -> Path:
    """A copy of a saved model whose config says ``max_seq_length=length``."""
    shutil.copytree(model_dir, target)
    config = json.loads((target / "config.json").read_text())
    config["max_seq_length"] = length
    (target / "config.json").write_text(json.dumps(config))
    return target


def test_units_hold_at_most_rows_per_file_inside_one_row_group(tmp_path, tiny_model_dir):
    from pipelines.sink.units import plan_units, read_unit
    from pipelines.storage import list_parquet_files, locate

    inp, out = tmp_path / "in.parquet", tmp_path / "out"
    write(inp, [f"r{i}" for i in range(1050)], row_group_size=1000)  # row groups of 1000 and 50 rows
    loc = locate(str(inp))
    units, _ = plan_units(loc, list_parquet_files(loc), 300)
    assert [u.rows for u in units] == [300, 300, 300, 150]  # the last: 100 rows of group 0 and group 1's 50
    table, rows = read_unit(units[1].to_dict(), loc.fs, ["id"])
    assert table.column("id").to_pylist() == [f"r{i}" for i in range(300, 600)] and list(rows) == list(range(300, 600))
    table, rows = read_unit(units[3].to_dict(), loc.fs, ["id"])
    assert table.column("id").to_pylist() == [f"r{i}" for i in range(900, 1050)]
    manifest = score(cfg(inp, out, tiny_model_dir, rows_per_file=300))
    files = list(out.glob("part-*.parquet"))
    assert manifest["status"] == "complete" and len(files) == 4
    assert max(pq.ParquetFile(f).metadata.num_rows for f in files) <= 300


# --- _SUCCESS only while the last verification passed ------------------------------------------------


def test_failed_verification_removes_an_old_success(tmp_path, tiny_model_dir):
    inp, out = tmp_path / "in.parquet", tmp_path / "out"
    write(inp, [f"r{i}" for i in range(20)])
    score(cfg(inp, out, tiny_model_dir))
    assert (out / "_SUCCESS").exists()
    part = next(out.glob("part-*.parquet"))
    table = pq.read_table(part)  # an id rewritten behind the job's back; the commit record kept
    ids = table.column("id").to_pylist()
    ids[0] = "tampered"
    pq.write_table(table.set_column(0, "id", pa.array(ids)).replace_schema_metadata(table.schema.metadata), part)
    with pytest.raises(RuntimeError, match="ids in the output differ from the ids in the input"):
        score(cfg(inp, out, tiny_model_dir))
    assert not (out / "_SUCCESS").exists()
    assert json.loads((out / "_manifest.json").read_text())["status"] == "incomplete"


# --- the row cover is exact -------------------------------------------------------------------------


class _F:
    def __init__(self, name, *ranges):
        self.name, self.ranges = name, [list(r) for r in ranges]


def test_exact_cover_finds_a_cover_that_a_greedy_pass_misses():
    from pipelines.sink.cover import exact_cover

    # Sorted by start, a greedy pass takes a=[0,6) first and then cannot continue; b + c is a cover.
    chosen, extra, problem = exact_cover(10, [_F("a", (0, 6)), _F("b", (0, 3)), _F("c", (3, 10))])
    assert problem is None and [f.name for f in chosen] == ["b", "c"] and [f.name for f in extra] == ["a"]
    chosen, extra, problem = exact_cover(10, [_F("a", (0, 2), (5, 10)), _F("b", (0, 5)), _F("c", (2, 5)), _F("d", (5, 10))])
    assert problem is None and sorted(f.name for f in chosen) in (["a", "c"], ["b", "d"])


def test_exact_cover_reports_missing_and_inconsistent_rows_and_removes_nothing():
    from pipelines.sink.cover import exact_cover

    chosen, extra, problem = exact_cover(10, [_F("a", (0, 6)), _F("b", (0, 3))])
    assert problem == "4 of its 10 rows are not in the output" and extra == []
    chosen, extra, problem = exact_cover(10, [_F("a", (0, 6)), _F("b", (0, 3)), _F("c", (4, 10))])
    assert "no subset of them holds each row once" in problem and extra == []


def test_exact_cover_that_gives_up_says_so_instead_of_ruling_a_cover_out(monkeypatch):
    from pipelines.sink import cover

    # Files of two ranges each force the general search; one step is too few to finish it.
    files = [_F("a", (0, 2), (5, 10)), _F("b", (0, 5)), _F("c", (2, 5)), _F("d", (5, 10))]
    monkeypatch.setattr(cover, "MAX_STEPS", 1)
    chosen, extra, problem = cover.exact_cover(10, files)
    assert "gave up after 1 steps (none was found, none was ruled out)" in problem and extra == []
    monkeypatch.setattr(cover, "MAX_STEPS", 1000)
    assert cover.exact_cover(10, files)[2] is None


def test_exact_cover_of_thousands_of_files_is_fast_and_iterative():
    from pipelines.sink.cover import exact_cover

    files = [_F(f"p{i:05d}", (i * 10, i * 10 + 10)) for i in range(5000)]
    files.append(_F("retry", (0, 5)))  # one overlap forces the search
    files.append(_F("retry2", (5, 10)))
    chosen, extra, problem = exact_cover(50_000, files)
    assert problem is None and len(chosen) + len(extra) == 5002


def test_a_signed_url_input_leaves_no_secret_in_what_the_job_writes(tmp_path, tiny_model_dir, ray_local, caplog):
    """A presigned S3 URL (moto's server, plain HTTP) as the input: its signature and credential are
    in the query string, which must not reach the manifest, the part files' footers, the lease record
    or the logs."""
    import boto3
    import io
    import logging

    from pipelines.storage import RedactingFilter
    from tests.conftest import moto_s3

    with moto_s3(own_process=True) as endpoint:
        from botocore.config import Config

        s3 = boto3.client("s3", endpoint_url=endpoint, config=Config(signature_version="s3v4"))
        s3.create_bucket(Bucket="corpus")
        buf = io.BytesIO()
        pq.write_table(pa.table({"id": [f"r{i}" for i in range(12)], "text": [f"text {i}" for i in range(12)]}), buf)
        s3.put_object(Bucket="corpus", Key="night/in.parquet", Body=buf.getvalue())
        url = s3.generate_presigned_url("get_object", Params={"Bucket": "corpus", "Key": "night/in.parquet"}, ExpiresIn=3600)
        signature = url.split("X-Amz-Signature=")[1].split("&")[0]
        assert len(signature) > 20 and os.environ["AWS_ACCESS_KEY_ID"] in url
        out = tmp_path / "out"
        caplog.handler.addFilter(RedactingFilter())  # as a job's setup_logging does on its handlers
        with caplog.at_level(logging.DEBUG):  # fsspec's debug lines name every URL it fetches
            manifest = run_score(cfg(url, out, tiny_model_dir))
    assert manifest["status"] == "complete" and manifest["rows_out"] == 12
    assert manifest["input"] == url.split("?")[0] + "?REDACTED"
    written = [(out / "_manifest.json").read_text()]
    written += [json.dumps({k.decode(): v.decode() for k, v in pq.read_schema(p).metadata.items()}) for p in out.glob("*.parquet")]
    written += [p.read_text() for p in (out / "_mtcls").rglob("*.json")]  # lease records
    written.append(caplog.text)
    for text in written:
        assert signature not in text and "X-Amz-Credential" not in text
