"""An Iceberg table as the scoring input: the data files of one snapshot, through a catalog (SQLite here)."""

from __future__ import annotations

import pandas as pd
import pyarrow as pa
import pytest

pytest.importorskip("pyiceberg")
from pyiceberg.catalog import load_catalog  # noqa: E402

from pipelines.config import ConfigError  # noqa: E402
from pipelines.sources import resolve_iceberg  # noqa: E402
from pipelines.storage import InputError  # noqa: E402


def batch(start: int, n: int) -> pa.Table:
    return pa.table({"id": [f"row-{i:05d}" for i in range(start, start + n)],
                     "text": [f"review number {i}: " + "fine " * (i % 5) for i in range(start, start + n)]})


@pytest.fixture()
def catalog(tmp_path):
    props = {"type": "sql", "uri": f"sqlite:///{tmp_path}/catalog.db", "warehouse": f"file://{tmp_path}/warehouse"}
    cat = load_catalog("test", **props)
    cat.create_namespace("lake")
    return cat, {**props, "name": "test"}


def test_the_files_of_the_snapshot_read(catalog):
    cat, props = catalog
    table = cat.create_table("lake.corpus", schema=batch(0, 1).schema)
    table.append(batch(0, 10))
    first = table.current_snapshot().snapshot_id
    table.append(batch(10, 5))
    latest = resolve_iceberg("lake.corpus", None, props, ("id", "text"))
    assert (latest.format, latest.table, latest.version) == ("iceberg", "lake.corpus", cat.load_table("lake.corpus").current_snapshot().snapshot_id)
    assert len(latest.files) == 2 and all(f.startswith(latest.loc.path) for f in latest.files)
    pinned = resolve_iceberg("lake.corpus", first, props)
    assert pinned.version == first and len(pinned.files) == 1
    assert pinned.describe()["table"] == "lake.corpus" and pinned.name == "iceberg table lake.corpus"

    with pytest.raises(InputError, match="has no snapshot 12345"):
        resolve_iceberg("lake.corpus", 12345, props)
    with pytest.raises(InputError, match=r"has no column\(s\) \['body'\]"):
        resolve_iceberg("lake.corpus", None, props, ("id", "body"))
    with pytest.raises(InputError, match="cannot load Iceberg table 'lake.absent'"):
        resolve_iceberg("lake.absent", None, props)
    with pytest.raises(ConfigError, match="key 'catalog'"):
        resolve_iceberg("lake.corpus", None, {"type": "no-such-catalog-type"})

    # A renamed column, then a new one under the old name: old files hold another field under it.
    from pyiceberg.types import StringType

    with table.update_schema() as update:
        update.rename_column("text", "body")
    with table.update_schema() as update:
        update.add_column("text", StringType())
    with pytest.raises(InputError, match="column 'text' named different fields in its schema history"):
        resolve_iceberg("lake.corpus", None, props, ("id", "text"))


@pytest.mark.parametrize("keys, message", [
    (["input_table=lake.t", "input=/x"], "key 'input_table': give either input"),
    (["input_format=iceberg"], "key 'input_table': input_format=iceberg reads the table"),
    (["input_table=lake.t", "input_format=delta"], "key 'input_format': input_table is an Iceberg table"),
    (["input_table=lake.t", "input_version=3"], "key 'input_version': pins a Delta table's version"),
    (["input_table=lakeonly"], "key 'input_table': expected namespace.name"),
    (["input=/x", "input_snapshot=3"], "key 'input_snapshot': only for an Iceberg input"),
    (["input=/x", "catalog.type=sql"], "key 'catalog': only for an Iceberg input"),
    (["input=/x", "input_format=parquet", "input_version=2"], "key 'input_version': pins a Delta table's version"),
])
def test_table_input_keys_fail_before_any_work_naming_the_key(keys, message):
    from pipelines.config import load_config
    from pipelines.score import ScoreConfig

    with pytest.raises(ConfigError, match=message):
        load_config(ScoreConfig, None, ["output=/tmp/never", *keys])


def test_dotted_catalog_properties_reach_pyiceberg_as_named():
    from pipelines.config import load_config
    from pipelines.score import ScoreConfig

    cfg = load_config(ScoreConfig, None, ["input_table=lake.t", "catalog.type=rest", "catalog.s3.endpoint=http://minio:9000",
                                          "catalog.rest.sigv4-enabled=true"])
    assert cfg.catalog == {"type": "rest", "s3.endpoint": "http://minio:9000", "rest.sigv4-enabled": "true"}


def test_appended_snapshots_are_scored_once(catalog, tmp_path, tiny_model_dir):
    from pipelines.score import ScoreConfig, run_score

    cat, props = catalog
    table = cat.create_table("lake.corpus", schema=batch(0, 1).schema)
    table.append(batch(0, 30))

    def cfg(**kw):
        return ScoreConfig(input_table="lake.corpus", catalog={**props, "token": "tok-SECRET-1"}, output=str(tmp_path / kw.pop("out", "scores")),
                           model=str(tiny_model_dir), progress=False, block_rows=32, max_tokens_per_batch=256, **kw)

    first = run_score(cfg(), inline=True)
    assert first["rows_scored_this_run"] == 30 and first["input_format"] == "iceberg"
    # A catalog secret never reaches the manifest (the SQL catalog ignores the extra property).
    assert first["config"]["catalog"]["token"] == "REDACTED" and "tok-SECRET-1" not in (tmp_path / "scores" / "_manifest.json").read_text()
    assert first["input"] == "iceberg table lake.corpus" and first["input_version"] == table.current_snapshot().snapshot_id
    snapshot = table.current_snapshot().snapshot_id
    table.append(batch(30, 9))
    second = run_score(cfg(), inline=True)
    assert second["rows_scored_this_run"] == 9 and second["rows_out"] == 39 and second["status"] == "complete"
    out = pd.read_parquet(tmp_path / "scores")
    assert sorted(out["id"]) == sorted(table.scan().to_arrow().column("id").to_pylist()) and out["id"].is_unique
    assert run_score(cfg(out="as_of_first", input_snapshot=snapshot), inline=True)["rows_out"] == 30
