"""A Delta Lake table as the scoring input: read through its log at one version, nightly appends scored once."""

from __future__ import annotations

import json

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytest.importorskip("deltalake")
from deltalake import DeltaTable, write_deltalake  # noqa: E402

from pipelines.config import ConfigError  # noqa: E402
from pipelines.sources import resolve_input  # noqa: E402
from pipelines.storage import InputError, locate  # noqa: E402


def batch(start: int, n: int, day: str = "2026-12-01") -> pa.Table:
    ids = [f"row-{i:05d}" for i in range(start, start + n)]
    return pa.table({"id": ids, "text": [f"review number {i}: " + "fine " * (i % 7) for i in range(start, start + n)],
                     "day": [day] * n})


def test_the_files_of_the_version_read_not_the_directory(tmp_path):
    table = tmp_path / "t"
    write_deltalake(table, batch(0, 10))
    write_deltalake(table, batch(10, 5), mode="append")
    write_deltalake(table, batch(100, 4), mode="overwrite")  # version 2: the first two files removed, still on disk
    loc = locate(str(table))
    latest = resolve_input(loc)
    assert (latest.format, latest.version) == ("delta", 2)
    assert len(list(table.glob("*.parquet"))) == 3 and len(latest.files) == 1
    assert pq.read_table(latest.files[0]).column("id").to_pylist() == [f"row-{i:05d}" for i in range(100, 104)]
    pinned = resolve_input(loc, "auto", 1)
    assert pinned.version == 1 and sum(pq.read_metadata(f).num_rows for f in pinned.files) == 15
    assert pinned.describe() == {"uri": str(table), "format": "delta", "version": 1}

    with pytest.raises(InputError, match="is a Delta table: read as a Parquet directory it would include"):
        resolve_input(loc, "parquet")
    with pytest.raises(InputError, match="at version 9: the latest is 2"):
        resolve_input(loc, "delta", 9)
    plain = tmp_path / "plain"
    plain.mkdir()
    pq.write_table(batch(0, 3), plain / "a.parquet")
    assert resolve_input(locate(str(plain))).format == "parquet"
    with pytest.raises(ConfigError, match="key 'input_version'"):
        resolve_input(locate(str(plain)), "auto", 0)
    with pytest.raises(InputError, match="is not a Delta table"):
        resolve_input(locate(str(plain)), "delta")


def test_a_needed_partition_column_is_refused_naming_it(tmp_path):
    table = tmp_path / "t"
    write_deltalake(table, batch(0, 6), partition_by=["day"])
    loc = locate(str(table))
    assert len(resolve_input(loc, needed=("id", "text")).files) == 1  # the partition column is not needed: fine
    with pytest.raises(InputError, match=r"\['day'\] are partition columns"):
        resolve_input(loc, needed=("id", "text", "day"))


def test_nightly_appends_are_scored_once_and_a_pinned_version_reads_that_version(tmp_path, tiny_model_dir):
    from pipelines.score import ScoreConfig, run_score

    table, out = tmp_path / "corpus", tmp_path / "scores"
    write_deltalake(table, batch(0, 40))
    write_deltalake(table, batch(40, 25), mode="append")

    def cfg(**kw):
        return ScoreConfig(input=str(table), output=str(kw.pop("output", out)), model=str(tiny_model_dir), progress=False,
                           block_rows=32, max_tokens_per_batch=256, passthrough_columns=["day"], **kw)

    first = run_score(cfg(), inline=True)
    assert first["rows_scored_this_run"] == 65 and first["status"] == "complete"
    assert (first["input_format"], first["input_version"]) == ("delta", 1)
    write_deltalake(table, batch(65, 12, day="2026-12-02"), mode="append")  # the next night's rows
    second = run_score(cfg(), inline=True)
    assert second["rows_scored_this_run"] == 12 and second["input_version"] == 2 and second["rows_out"] == 77
    scored = pd.read_parquet(out)
    assert sorted(scored["id"]) == sorted(DeltaTable(str(table)).to_pandas()["id"]) and scored["id"].is_unique
    assert (scored.set_index("id").loc["row-00070", "day"]) == "2026-12-02"
    assert json.loads((out / "_manifest.json").read_text())["input_version"] == 2

    pinned = run_score(cfg(output=tmp_path / "as_of_v0", input_version=0), inline=True)
    assert pinned["rows_out"] == 40 and pinned["input_version"] == 0

    # Compaction rewrites the input's rows into new files: the old files' rows are refused, not silently
    # kept twice; prune_missing=true says to replace them.
    DeltaTable(str(table)).optimize.compact()
    with pytest.raises(InputError, match="prune_missing=true"):
        run_score(cfg(), inline=True)
    assert len(pd.read_parquet(out)) == 77
