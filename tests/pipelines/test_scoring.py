import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoTokenizer

import mtcls
from mtcls.profile import merge_profiles, reference_document
from pipelines.config import ConfigError, load_config
from pipelines.resources import plan_resources
from pipelines.score import ScoreConfig, run_score
from pipelines.storage import InputError

TEXTS = [
    "the delivery was quick",
    "terrible quality, broke in a day",
    "great value for the money and friendly staff " * 3,
    "meh",
    "word " * 400,  # longer than max_length: truncated, flagged
]


def write_corpus(path, n=60, start=0):
    ids = [f"row-{start + i:05d}" for i in range(n)]
    texts = [TEXTS[i % len(TEXTS)] + f" #{start + i}" for i in range(n)]
    pq.write_table(pa.table({"id": ids, "text": texts, "source": ["a"] * n}), path)
    return dict(zip(ids, texts))


def score(tmp_path, model_dir, inline=True, **overrides):
    """Runs the scoring job in this process without Ray (``inline``), unless the test is about Ray."""
    args = {"output": str(tmp_path / "out"), "model": str(model_dir), "progress": False, "block_rows": 16, "max_tokens_per_batch": 256, "lock_timeout_s": 5}
    args.update(overrides)
    cfg = load_config(ScoreConfig, None, [f"{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in args.items()])
    return cfg, run_score(cfg, inline=inline)


def read_output(path):
    return pd.read_parquet(path).set_index("id").sort_index()


def test_output_equals_direct_model_predictions(tmp_path, tiny_model_dir, ray_local):  # on Ray
    (tmp_path / "in").mkdir()
    texts = write_corpus(tmp_path / "in" / "a.parquet", 40)
    texts.update(write_corpus(tmp_path / "in" / "b.parquet", 30, start=40))
    # A calibrated head (temperature 2) and uncalibrated ones: the output holds the calibrated scores.
    calibrated = mtcls.MultiTaskModel.from_pretrained(tiny_model_dir)
    calibrated.set_head_spec(dataclasses.replace(calibrated.specs["type"], temperature=2.0))
    calibrated.save_pretrained(tmp_path / "model")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "model")
    tiny_model_dir = tmp_path / "model"
    cfg, manifest = score(tmp_path, tiny_model_dir, input=str(tmp_path / "in"), passthrough_columns=["source"], max_length=32,
                           precision="fp32", inline=False)
    out = read_output(cfg.output)
    # The same stages run in this process (run_score(inline=True)) write the same table.
    score(tmp_path, tiny_model_dir, input=str(tmp_path / "in"), passthrough_columns=["source"], max_length=32,
          precision="fp32", output=str(tmp_path / "inline"))
    pd.testing.assert_frame_equal(read_output(tmp_path / "inline"), out)
    assert sorted(out.index) == sorted(texts) and manifest["rows_out"] == manifest["rows_in"] == 70
    assert manifest["calibration"] == {"type": 2.0}
    assert manifest["precision"] == {"requested": "fp32", "used_this_run": {"fp32": "set in the config"}}
    commits = [json.loads(pq.read_schema(p).metadata[b"mtcls_commit"]) for p in Path(cfg.output).glob("*.parquet")]
    assert {(p["name"], p["reason"]) for c in commits for p in c["precision"]} == {("fp32", "set in the config")}
    model = mtcls.MultiTaskModel.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = sorted(texts)
    direct = mtcls.predict_texts(model, tok, [texts[i] for i in ids], max_length=32)
    for column, values in direct.items():
        got = out.loc[ids, column].tolist()
        if column.endswith(("_score", "_probs")):
            np.testing.assert_allclose(np.stack([np.stack(v) for v in got]).astype(float) if column.endswith("topic_probs") else np.array([np.asarray(v, float) for v in got]), np.asarray(direct[column], float), atol=1e-5, err_msg=column)
        else:
            assert [list(v) if isinstance(v, np.ndarray) else v for v in got] == list(direct[column]), column
    assert out["truncated"].sum() == sum(len(texts[i].split()) > 30 for i in ids) > 0
    assert out["error"].isna().all() and (out["source"] == "a").all()
    # The profile, merged over files and blocks, is the mix of the output's own label columns.
    profile = manifest["profile"]
    assert profile["rows"] == 70 and profile["error_rate"] == 0 and profile["truncated_rate"] == pytest.approx(out["truncated"].mean())
    shares = out["type_label"].value_counts(normalize=True)
    assert profile["heads"]["type"]["prediction_mix"] == {l: pytest.approx(shares.get(l, 0.0)) for l in ["news", "opinion", "ad"]}
    assert profile["heads"]["type"]["mean_score"] == pytest.approx(out["type_score"].mean(), abs=1e-6)
    assert profile["heads"]["tags"]["prediction_mix"]["x"] == pytest.approx(out["tags_labels"].map(lambda v: "x" in v).mean())
    assert profile["heads"]["topic"]["prediction_mix"]["race"]["pos"] == pytest.approx((out["topic_race_label"] == "pos").mean())
    assert manifest["drift"]["reference"] is False and manifest["drift"]["flagged"] == []
    # Self-describing: labels and model identity in the schema metadata, columns in documented order.
    schema = pq.read_schema(next((tmp_path / "out").glob("part-*.parquet")))
    meta = json.loads(schema.metadata[b"mtcls"])
    assert [h["labels"] for h in meta["heads"]][1] == ["news", "opinion", "ad"]
    assert meta["model"]["weights_sha256"] == manifest["model"]["weights_sha256"]
    assert schema.names[:2] == ["id", "source"] and schema.names[-2:] == ["truncated", "error"]
    assert (tmp_path / "out" / "_SUCCESS").exists()


def test_bad_rows_are_kept_with_an_error(tmp_path, tiny_model_dir):
    table = pa.table(
        {
            "id": ["ok", "null", "empty", "space", "nul", "title-only"],
            "text": ["fine text", None, "", "   \t\n", "bad\x00chars", None],
            "title": [None, None, None, None, None, "a title"],
        }
    )
    pq.write_table(table, tmp_path / "in.parquet")
    cfg, manifest = score(tmp_path, tiny_model_dir, input=str(tmp_path / "in.parquet"), text_columns=["text"])
    out = read_output(cfg.output)
    assert len(out) == 6 and manifest["rows_error"] == 4
    assert out.loc["null", "error"] == "empty text: column 'text' is null, empty or whitespace"
    assert out.loc[["empty", "space", "title-only"], "error"].notna().all()
    assert out.loc[["ok", "nul"], "error"].isna().all()
    assert out.loc["null", ["type_label", "type_score", "truncated"]].isna().all()
    # precision=auto: the actors resolve it on this machine's CPU and the manifest records what they used.
    auto = mtcls.resolve_precision("auto", torch.device("cpu"))
    assert manifest["precision"] == {"requested": "auto", "used_this_run": {auto.name: auto.reason}}
    # Two text columns: a row with only a title is scored.
    cfg2, _ = score(tmp_path, tiny_model_dir, input=str(tmp_path / "in.parquet"), text_columns=["title", "text"], output=str(tmp_path / "out2"))
    assert pd.isna(read_output(cfg2.output).loc["title-only", "error"])


def test_non_string_and_invalid_utf8_text_columns(tmp_path, tiny_model_dir):
    pq.write_table(pa.table({"id": ["a", "b"], "text": [1, 2]}), tmp_path / "ints.parquet")
    cfg, manifest = score(tmp_path, tiny_model_dir, input=str(tmp_path / "ints.parquet"))
    assert manifest["rows_error"] == 2
    assert read_output(cfg.output)["error"].tolist() == ["column 'text': expected a string, got int"] * 2
    pq.write_table(pa.table({"id": ["a", "b"], "text": pa.array([b"ok", b"\xff\xfe"], pa.binary())}), tmp_path / "bin.parquet")
    cfg, manifest = score(tmp_path, tiny_model_dir, input=str(tmp_path / "bin.parquet"), output=str(tmp_path / "o2"))
    out = read_output(cfg.output)
    assert pd.isna(out.loc["a", "error"]) and out.loc["b", "error"].startswith("column 'text': invalid UTF-8")


def test_bad_inputs_fail_before_any_output(tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    with pytest.raises(InputError, match="input path .*nope.* does not exist"):
        score(tmp_path, tiny_model_dir, input=str(tmp_path / "nope"))
    (tmp_path / "in").mkdir()
    write_corpus(tmp_path / "in" / "good.parquet", 5)
    (tmp_path / "in" / "corrupt.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(InputError, match="cannot read Parquet file .*corrupt.parquet"):
        score(tmp_path, tiny_model_dir, input=str(tmp_path / "in"))
    (tmp_path / "in" / "corrupt.parquet").unlink()
    with pytest.raises(InputError, match=r"has no column\(s\) \['body'\]"):
        score(tmp_path, tiny_model_dir, input=str(tmp_path / "in"), text_columns=["body"])
    assert not out.exists() or not any(out.glob("*.parquet"))


def _parts(out):
    return sorted(p.name for p in out.glob("part-*.parquet"))


def test_rerun_skips_committed_rows_and_scores_only_what_is_missing(tmp_path, tiny_model_dir):
    (tmp_path / "in").mkdir()
    ids = set()
    for k in range(3):
        ids |= set(write_corpus(tmp_path / "in" / f"p{k}.parquet", 20, start=20 * k))
    out = tmp_path / "out"
    _, first = score(tmp_path, tiny_model_dir, input=str(tmp_path / "in"), rows_per_file=20)
    files = _parts(out)
    assert len(files) >= 3
    # A kill before the last files were committed: they are missing, staging holds a half-written file.
    lost = files[-2:]
    lost_rows = sum(pq.read_metadata(out / f).num_rows for f in lost)
    for name in lost:
        (out / name).unlink()
    (out / "_SUCCESS").unlink()
    (out / "_mtcls" / "staging" / "part-half-written.parquet.1234").write_bytes(b"PAR1 partial")
    cfg, manifest = score(tmp_path, tiny_model_dir, input=str(tmp_path / "in"), rows_per_file=20)
    assert manifest["rows_scored_this_run"] == lost_rows
    table = pd.read_parquet(cfg.output)
    assert len(table) == 60 and set(table["id"]) == ids and table["id"].is_unique
    assert not any((out / "_mtcls" / "staging").iterdir()) and (out / "_SUCCESS").exists()
    assert manifest["profile"] == first["profile"]  # merged from the files on disk, whichever run wrote them

    # A no-op rerun (with another unit size) changes nothing, and the manifest on disk says so. Its
    # model's reference profile is this output's own: no drift on any head.
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    own = merge_profiles([json.loads(pq.read_schema(out / f).metadata[b"mtcls_commit"])["profile"] for f in files])
    (model / "reference_profile.json").write_text(json.dumps(reference_document(own, "test")))
    _, again = score(tmp_path, model, input=str(tmp_path / "in"), rows_per_file=7)
    assert again["drift"]["flagged"] == [] and {h["psi"] for h in again["drift"]["heads"].values()} == {0.0}
    assert again["rows_scored_this_run"] == 0 and _parts(out) == files
    assert json.loads((out / "_manifest.json").read_text())["rows_scored_this_run"] == 0

    write_corpus(tmp_path / "in" / "p3.parquet", 5, start=60)  # a new file: only it is scored
    _, more = score(tmp_path, tiny_model_dir, input=str(tmp_path / "in"))
    assert more["rows_scored_this_run"] == 5 and pd.read_parquet(cfg.output)["id"].is_unique

    # Resuming with other columns, or another model, would mix two tables in one: refused, nothing written.
    write_corpus(tmp_path / "in" / "p4.parquet", 5, start=65)
    with pytest.raises(InputError, match="holds files written with other columns than this run writes"):
        score(tmp_path, tiny_model_dir, input=str(tmp_path / "in"), passthrough_columns=["source"])
    other = tmp_path / "other_model"
    shutil.copytree(tiny_model_dir, other)
    config = json.loads((other / "config.json").read_text())
    config["heads"][0]["thresholds"] = 0.9
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match=r"written with another model \(weights, heads"):
        score(tmp_path, other, input=str(tmp_path / "in"))
    assert len(pd.read_parquet(cfg.output)) == 65


def test_a_changed_input_file_is_rescored_and_its_old_rows_removed(tmp_path, tiny_model_dir):
    (tmp_path / "in").mkdir()
    write_corpus(tmp_path / "in" / "a.parquet", 10)
    old_b = write_corpus(tmp_path / "in" / "b.parquet", 10, start=10)
    score(tmp_path, tiny_model_dir, input=str(tmp_path / "in"))
    import time

    time.sleep(0.01)
    new = write_corpus(tmp_path / "in" / "b.parquet", 12, start=100)  # b rewritten with other rows
    _, manifest = score(tmp_path, tiny_model_dir, input=str(tmp_path / "in"))
    table = pd.read_parquet(tmp_path / "out")
    assert manifest["rows_scored_this_run"] == 12 and len(table) == 22
    assert set(new) <= set(table["id"]) and not set(old_b) & set(table["id"])
    assert len(manifest["verification"]["stale_files_removed"]) >= 1


def test_duplicate_files_are_removed_and_damaged_files_are_caught(tmp_path, tiny_model_dir):
    write_corpus(tmp_path / "in.parquet", 30)
    score(tmp_path, tiny_model_dir, input=str(tmp_path / "in.parquet"))
    out = tmp_path / "out"
    first = _parts(out)[0]
    # A retried write that landed under another name: the same rows twice on disk.
    (out / "part-retried-copy.parquet").write_bytes((out / first).read_bytes())
    (out / "_SUCCESS").unlink()
    _, manifest = score(tmp_path, tiny_model_dir, input=str(tmp_path / "in.parquet"))
    assert manifest["rows_out"] == 30 and pd.read_parquet(out)["id"].is_unique
    assert len(manifest["verification"]["duplicate_files_removed"]) == 1

    # Rows changed on disk behind the job's back: the id check refuses to write _SUCCESS.
    victim = _parts(out)[0]
    table = pq.read_table(out / victim)
    ids = table.column("id").to_pylist()
    ids[0] = "someone-else"
    pq.write_table(table.set_column(0, "id", pa.array(ids)), out / victim)
    (out / "_SUCCESS").unlink()
    with pytest.raises(RuntimeError, match="ids in the output differ from the ids in the input"):
        score(tmp_path, tiny_model_dir, input=str(tmp_path / "in.parquet"))
    assert not (out / "_SUCCESS").exists()


def test_a_second_job_on_a_held_output_fails_naming_the_holder(tmp_path, tiny_model_dir):
    from pipelines.sink.lock import LockHeldError, OutputLock
    from pipelines.storage import locate

    write_corpus(tmp_path / "in.parquet", 5)
    (tmp_path / "out" / "_mtcls").mkdir(parents=True)
    with OutputLock(locate(str(tmp_path / "out")), owner={"run_id": "cron-2026-11-22"}):
        with pytest.raises(LockHeldError, match="cron-2026-11-22") as err:
            score(tmp_path, tiny_model_dir, input=str(tmp_path / "in.parquet"))
        assert "pid" in str(err.value) and not _parts(tmp_path / "out")
    _, manifest = score(tmp_path, tiny_model_dir, input=str(tmp_path / "in.parquet"))
    assert manifest["rows_out"] == 5


def test_foreign_output_directory_is_refused(tmp_path, tiny_model_dir):
    write_corpus(tmp_path / "in.parquet", 5)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "important.csv").write_text("x")
    with pytest.raises(InputError, match="not empty and was not written by mtcls"):
        score(tmp_path, tiny_model_dir, input=str(tmp_path / "in.parquet"))
    cfg, manifest = score(tmp_path, tiny_model_dir, input=str(tmp_path / "in.parquet"), overwrite=True)
    assert manifest["rows_out"] == 5


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["batch_sise=3"], r"unknown key\(s\) \['batch_sise'\]"),
        (["max_tokens_per_batch=abc"], "key 'max_tokens_per_batch': expected int"),
        (["max_tokens_per_batch=-1"], "key 'max_tokens_per_batch': must be >= 0"),
        (["precision=fp8"], "key 'precision'"),
        (["text_columns=[]"], "key 'text_columns'"),
        (["passthrough_columns=[id]"], "key 'passthrough_columns'"),
        (["drift_threshold=0"], "key 'drift_threshold': must be a positive number"),
        (["drift_threshold=-0.5"], "key 'drift_threshold'"),
        (["fail_on_drift=true", "profile=false"], "key 'fail_on_drift': needs profile=true"),
    ],
)
def test_bad_config_names_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(ScoreConfig, None, overrides)


def test_resource_plan_never_takes_every_cpu():
    plan = plan_resources(ScoreConfig(), {"CPU": 2.0})
    assert (plan.num_actors, plan.num_cpus, plan.num_gpus) == (1, 1.0, 0.0)
    assert plan_resources(ScoreConfig(), {"CPU": 16.0}).num_actors == 15
    gpu = plan_resources(ScoreConfig(), {"CPU": 32.0, "GPU": 4.0})
    assert (gpu.num_actors, gpu.num_gpus) == (4, 1.0)
    with pytest.raises(ConfigError, match="'num_cpus_per_actor'.*leaves no CPU"):
        plan_resources(ScoreConfig(num_cpus_per_actor=2), {"CPU": 2.0})
    with pytest.raises(ConfigError, match="'num_actors'.*would hang"):
        plan_resources(ScoreConfig(num_actors=2), {"CPU": 2.0})
    with pytest.raises(ConfigError, match="'num_gpus_per_actor'"):
        plan_resources(ScoreConfig(num_gpus_per_actor=1), {"CPU": 2.0})
