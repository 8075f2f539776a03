"""Scoring, training and evaluation read and write s3:// URIs (moto's S3 server on loopback).

Credentials come from the environment and must never appear in logs, manifests or reports.
"""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import moto_s3

SECRET = "mtcls-test-secret-Zq9"


@pytest.fixture(scope="module")
def s3():
    import ray
    import s3fs

    with moto_s3(SECRET):
        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        fs.mkdir("mtcls-bucket")
        if ray.is_initialized():
            ray.shutdown()
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # workers inherit the credentials
        yield fs
        ray.shutdown()


def put_table(fs, table, uri):
    with fs.open(uri, "wb") as fh:
        pq.write_table(table, fh)


@pytest.mark.slow
def test_score_train_evaluate_on_s3(s3, tmp_path, tiny_model_dir, tiny_encoder_dir, capfd):
    from jobs import evaluate as evaluate_job
    from jobs import score as score_job
    from jobs import train as train_job

    fs = s3
    ids = [f"r{i}" for i in range(40)]
    texts = [("great value" if i % 2 else "awful service") + f" {i}" for i in range(40)]
    sentiment = ["pos" if i % 2 else "neg" for i in range(40)]
    put_table(fs, pa.table({"id": ids, "text": texts}), "mtcls-bucket/corpus/date=2026-11-22/part-0.parquet")
    put_table(fs, pa.table({"id": ids, "text": texts, "sentiment": sentiment}), "mtcls-bucket/labelled/train.parquet")
    put_table(fs, pa.table({"id": ids, "type": ["news" if i % 3 else "ad" for i in range(40)]}), "mtcls-bucket/labels/labels.parquet")
    fs.put(str(tiny_model_dir) + "/", "mtcls-bucket/models/tiny/", recursive=True)

    out = "s3://mtcls-bucket/scores/date=2026-11-22"
    score_job.main(["input=s3://mtcls-bucket/corpus/date=2026-11-22/", f"output={out}", "model=s3://mtcls-bucket/models/tiny", "progress=false"])
    assert fs.exists(f"{out}/_SUCCESS")
    files = [p for p in fs.ls(out) if p.endswith(".parquet")]
    assert sum(pq.ParquetFile(fs.open(p, "rb")).metadata.num_rows for p in files) == 40
    manifest = fs.cat(f"{out}/_manifest.json").decode()
    assert json.loads(manifest)["rows_out"] == 40

    report = evaluate_job.main([f"predictions={out}", "labels=s3://mtcls-bucket/labels/labels.parquet",
                                "output=s3://mtcls-bucket/reports/r1", "progress=false"])
    assert report["join"]["matched"] == 40 and fs.exists("mtcls-bucket/reports/r1/type_confusion.png")

    heads = '[{name: sentiment, kind: multiclass}]'
    train_job.main(["train=[s3://mtcls-bucket/labelled/train.parquet]", f"encoder={tiny_encoder_dir}", f"heads={heads}",
                    "output=s3://mtcls-bucket/models/trained", f"storage_path={tmp_path / 'rt'}", "epochs=1"])
    assert fs.exists("mtcls-bucket/models/trained/model.safetensors") and fs.exists("mtcls-bucket/models/trained/tokenizer.json")

    captured = capfd.readouterr()
    written = manifest + fs.cat("mtcls-bucket/reports/r1/report.json").decode() + fs.cat("mtcls-bucket/models/trained/training_summary.json").decode()
    for text in (captured.out, captured.err, written):
        assert SECRET not in text
