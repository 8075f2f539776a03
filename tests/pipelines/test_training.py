import json
import os
import random
import signal
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from safetensors.torch import load_file
from transformers import AutoTokenizer

import mtcls
from jobs import train as train_job
from mtcls.calibration import DEFAULT_MIN_GAIN
from mtcls.profile import head_profile, load_reference
from pipelines.config import ConfigError, load_config
from pipelines.storage import InputError
from pipelines.train.config import TrainConfig
from pipelines.train.batches import length_grouped
from pipelines.train.loop import Progress

WORDS = {"pos": ["great", "lovely", "excellent", "superb"], "neg": ["awful", "broken", "terrible", "bad"]}
TOPICS = {"sport": ["match", "goal", "team"], "tech": ["phone", "laptop", "chip"]}


def make_rows(n, seed, with_sentiment=True, with_topics=True):
    rng = random.Random(seed)
    rows = {"id": [], "text": [], "sentiment": [], "topics": []}
    for i in range(n):
        s = rng.choice(["pos", "neg"])
        topics = sorted(rng.sample(list(TOPICS), rng.choice([1, 2])))
        words = [rng.choice(WORDS[s])] + [rng.choice(TOPICS[t]) for t in topics] + ["the", "a", "it"]
        rng.shuffle(words)
        rows["id"].append(f"{seed}-{i}")
        rows["text"].append(" ".join(words))
        rows["sentiment"].append(s)
        rows["topics"].append(topics)
    table = pa.table({"id": rows["id"], "text": rows["text"], "sentiment": rows["sentiment"], "topics": pa.array(rows["topics"], pa.list_(pa.string()))})
    if not with_sentiment:
        table = table.drop_columns(["sentiment"])
    if not with_topics:
        table = table.drop_columns(["topics"])
    return table


HEADS = json.dumps([{"name": "sentiment", "kind": "multiclass", "class_weights": "balanced"},
                    {"name": "topics", "kind": "multilabel", "pos_weight": "balanced"}])


def train(tmp_path, encoder, *extra):
    # fp32: the tests compare training's metrics with fp32 predictions exactly (auto is bf16 on some CPUs).
    args = [f"output={tmp_path / 'model'}", f"encoder={encoder}", f"heads={HEADS}", f"storage_path={tmp_path / 'rt'}", "precision=fp32",
            "batch_size=16", "learning_rate=0.003", "warmup_ratio=0.0", "max_failures=1", *extra]
    return train_job.main(args)


@pytest.fixture()
def data(tmp_path):
    pq.write_table(make_rows(160, 1), tmp_path / "train.parquet")
    pq.write_table(make_rows(60, 2), tmp_path / "val.parquet")
    return tmp_path


@pytest.fixture()
def scratch(tmp_path, monkeypatch):
    """The driver's temporary directory, for a run to leave nothing in."""
    path = tmp_path / "scratch"
    path.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(path))
    return path


def test_training_learns_and_the_exported_best_model_reproduces_its_metrics(data, tiny_encoder_dir, ray_local, scratch):
    summary = train(data, tiny_encoder_dir, f"train=[{data / 'train.parquet'}]", f"validation=[{data / 'val.parquet'}]", "epochs=6", "learning_rate=0.005")
    losses = [e["train_loss"] for e in summary["epochs"]]
    assert losses[-1] < 0.85 * losses[0], losses
    assert summary["best_metrics"]["sentiment_macro_f1"] > 0.6
    # The exported model is the best epoch; scoring it again gives exactly the reported metrics.
    model = mtcls.MultiTaskModel.from_pretrained(data / "model")
    tok = AutoTokenizer.from_pretrained(data / "model")
    val = pq.read_table(data / "val.parquet")
    cols = mtcls.predict_texts(model, tok, val.column("text").to_pylist())
    spec = model.specs["sentiment"]
    y = mtcls.encode_labels(spec, val.column("sentiment").to_pylist())
    probs = np.array(cols["sentiment_probs"])
    macro = mtcls.head_report(spec, mtcls.head_statistics(spec, y, probs))["macro_f1"]
    assert macro == pytest.approx(summary["best_metrics"]["sentiment_macro_f1"], abs=1e-9)
    # The multilabel head was exported with the thresholds tuned on validation at the best epoch,
    # and reaches exactly the reported tuned macro-F1 with them.
    tuned = summary["tuned_thresholds"]["topics"]
    assert model.specs["topics"].thresholds == tuned["thresholds"]
    spec = model.specs["topics"]
    y = mtcls.encode_labels(spec, val.column("topics").to_pylist())
    stats = mtcls.head_statistics(spec, y, np.array(cols["topics_probs"]))
    assert mtcls.head_report(spec, stats)["macro_f1"] == pytest.approx(summary["best_metrics"]["topics_tuned_macro_f1"], abs=1e-9)
    assert summary["best_metrics"]["topics_tuned_macro_f1"] >= summary["best_metrics"]["topics_macro_f1"] - 1e-9  # tuning can only match or beat 0.5
    # Calibration (default on): the best epoch's calibration, where the held-out check kept one,
    # is in the model config and the summary, and the scores above were calibrated by it.
    for head in ("sentiment", "topics"):
        cal = summary["calibration"][head]
        assert cal["kept"] == (cal["heldout_gain"] >= DEFAULT_MIN_GAIN) and cal["fitted_temperature"] > 0
        assert model.specs[head].temperature == cal["temperature"] == summary["temperatures"].get(head)
        assert model.specs[head].logit_offset == cal["logit_offset"]
        assert (cal["temperature"] is None) == (not cal["kept"])
        assert cal["nll_after"] <= cal["nll_before"] + 1e-6 and 0 <= cal["ece_after"] <= 1 and 0 <= cal["ece_before"] <= 1
    # The reference profile next to the weights is the exported model's own profile of the
    # validation set (calibrated scores, tuned thresholds), plus the true-label counts.
    reference = load_reference(data / "model")
    assert reference["source"] == f"validation set, epoch {summary['best_epoch']}"
    for head in ("sentiment", "topics"):
        spec = model.specs[head]
        mine = head_profile(spec, spec.impl.probabilities_from_columns(spec, pa.table({f"{head}_probs": cols[f"{head}_probs"]})))
        ref = reference["heads"][head]
        assert ref["rows"] == mine["rows"] == val.num_rows and ref["mix"] == mine["mix"] and ref["score_hist"] == mine["score_hist"]
        counts, labelled = spec.impl.label_counts(spec, mtcls.encode_labels(spec, val.column(head).to_pylist()))
        assert ref["label_counts"] == counts and ref["labelled_rows"] == labelled
    # Balanced weights were resolved from label counts and saved with the model.
    assert isinstance(model.specs["sentiment"].class_weights, list)
    assert sorted(model.specs["topics"].labels) == ["sport", "tech"]
    assert (data / "model" / "sentiment_training.png").stat().st_size > 5000
    assert (data / "model" / "tokenizer.json").exists()
    assert not list(scratch.glob("mtcls-train-*"))  # the starting and best model copies are gone


def _kill_the_worker_once_a_checkpoint_is_registered(storage: Path, killed: list[int], timeout: float = 300.0) -> None:
    """SIGKILLs the Ray Train worker process(es) as soon as Ray Train has registered a first checkpoint.

    The controller writes its checkpoint snapshot when it registers a reported checkpoint; a worker
    killed before that would restart from scratch instead of resuming. The worker's pid comes from
    the GCS actor table (``ray.util.state`` would need the dashboard, which the test cluster lacks).
    """
    from ray._private.state import actors

    deadline = time.monotonic() + timeout
    while not list(storage.glob("*/checkpoint_manager_snapshot.json")):
        if time.monotonic() > deadline:
            return
        time.sleep(0.02)
    for actor in actors(actor_state_name="ALIVE").values():
        if actor["ActorClassName"] == "RayTrainWorker" and actor["Pid"] not in (0, os.getpid()):
            os.kill(actor["Pid"], signal.SIGKILL)
            killed.append(actor["Pid"])


def _epochs_without_timing(summary):
    return [{k: v for k, v in epoch.items() if k != "train_examples_per_s"} for epoch in summary["epochs"]]


@pytest.mark.slow
def test_a_run_whose_worker_is_killed_resumes_and_ends_as_an_uninterrupted_one(data, tiny_encoder_dir, ray_local, monkeypatch):
    # Ray Train picks up reports every 2 s by default; sooner, so the kill lands in the next epoch.
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
    args = [f"train=[{data / 'train.parquet'}]", f"validation=[{data / 'val.parquet'}]", "epochs=3"]
    killed: list[int] = []
    killer = threading.Thread(target=_kill_the_worker_once_a_checkpoint_is_registered, args=(data / "killed" / "rt", killed),
                              daemon=True)
    killer.start()
    resumed = train(data / "killed", tiny_encoder_dir, *args)
    killer.join()
    uninterrupted = train(data / "uninterrupted", tiny_encoder_dir, *args)

    assert len(killed) == 1, f"killed worker processes: {killed}"
    assert resumed["resumed_after_failure"] == 1, "the worker was killed after the last checkpoint"
    assert uninterrupted["resumed_after_failure"] == 0
    assert [e["epoch"] for e in resumed["epochs"]] == [0, 1, 2]
    assert resumed["optimizer_steps"] == uninterrupted["optimizer_steps"] == 3 * 10  # 160 rows in batches of 16
    for got, want in zip(_epochs_without_timing(resumed), _epochs_without_timing(uninterrupted), strict=True):
        assert got == pytest.approx(want, rel=1e-6, abs=1e-9)
    weights = [load_file(data / run / "model" / "model.safetensors") for run in ("killed", "uninterrupted")]
    assert weights[0].keys() == weights[1].keys()
    for name in weights[1]:
        assert np.allclose(weights[0][name].numpy(), weights[1][name].numpy(), rtol=1e-5, atol=1e-7), name


@pytest.mark.slow
def test_datasets_labelled_for_different_heads(tmp_path, tiny_encoder_dir, ray_local):
    pq.write_table(make_rows(80, 3, with_topics=False), tmp_path / "a.parquet")
    pq.write_table(make_rows(80, 4, with_sentiment=False), tmp_path / "b.parquet")
    table = make_rows(40, 5).to_pylist()
    table[0]["text"] = None  # skipped and counted, not a crash
    pq.write_table(pa.Table.from_pylist(table, schema=make_rows(1, 0).schema), tmp_path / "val.parquet")
    summary = train(tmp_path, tiny_encoder_dir, f"train=[{tmp_path / 'a.parquet'},{tmp_path / 'b.parquet'}]",
                    f"validation=[{tmp_path / 'val.parquet'}]", "epochs=2")
    assert summary["label_rows"]["sentiment"]["train"] == 80 and summary["label_rows"]["topics"]["train"] == 80
    assert summary["rows"]["train"] == 160 and summary["skipped_rows_without_text"]["validation"] == 1
    assert all(np.isfinite(e["train_loss"]) for e in summary["epochs"])


def test_bad_training_inputs_fail_before_training(tmp_path, tiny_encoder_dir, ray_local, scratch):
    pq.write_table(make_rows(30, 1), tmp_path / "train.parquet")
    pq.write_table(make_rows(10, 2, with_topics=False), tmp_path / "val_no_topics.parquet")
    pq.write_table(make_rows(0, 2), tmp_path / "empty.parquet")
    base = [f"train=[{tmp_path / 'train.parquet'}]"]
    with pytest.raises(InputError, match="head 'sentiment': label column 'mood' is in none of the training files"):
        train(tmp_path, tiny_encoder_dir, *base, 'heads=[{name: sentiment, kind: multiclass, column: mood}]')
    with pytest.raises(InputError, match="head 'sentiment': row .*: label 'neg' is not one of"):
        train(tmp_path, tiny_encoder_dir, *base, 'heads=[{name: sentiment, kind: multiclass, labels: [pos, neutral]}]')
    with pytest.raises(InputError, match="training set .* is empty"):
        train(tmp_path, tiny_encoder_dir, f"train=[{tmp_path / 'empty.parquet'}]")
    with pytest.raises(InputError, match="head 'topics': the validation set has no label"):
        train(tmp_path, tiny_encoder_dir, *base, f"validation=[{tmp_path / 'val_no_topics.parquet'}]")
    assert not (tmp_path / "model").exists()
    assert not list(scratch.glob("mtcls-train-*"))


@pytest.mark.parametrize(
    "override, message",
    [
        ('heads=[{name: h, kind: multiclass, labelz: [a]}]', r"heads\[0\].*unknown field\(s\) \['labelz'\]"),
        ('heads=[{name: h, kind: distribution}]', "distribution head needs 'labels'"),
        ('heads=[{name: h, kind: multiclass, labels: [a, a]}]', "duplicate label name 'a'"),
        ("best_metric=accuracy", "key 'best_metric'"),
        ("epochs=0", "key 'epochs'"),
        ("best_metric=h_tuned_macro_f1", "key 'best_metric'"),  # h is multiclass: nothing to tune
        ("length_grouping=0", "key 'length_grouping'"),
        ("threshold_bins=1", "key 'threshold_bins'"),
    ],
)
def test_bad_training_config_names_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TrainConfig, None, ["train=[x.parquet]", 'heads=[{name: h, kind: multiclass}]', override])


def test_length_grouping_keeps_every_row_once_and_cuts_padding():
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 60, size=1000)
    windows = []
    for start in range(0, 1000, 320):
        idx = np.arange(start, min(start + 320, 1000))
        ids = np.empty(len(idx), dtype=object)
        ids[:] = [list(range(n)) for n in lengths[idx]]
        windows.append({"input_ids": ids, "row": idx})
    batches = list(length_grouped(iter(windows), 32, seed=1))
    rows = np.concatenate([b["row"] for b in batches])
    assert sorted(rows.tolist()) == list(range(1000))
    assert all(len(b["row"]) <= 32 for b in batches)
    for b in batches:  # labels and ids stay aligned
        assert [len(x) for x in b["input_ids"]] == lengths[b["row"]].tolist()

    def padded(bs):
        return sum(max(len(x) for x in b["input_ids"]) * len(b["input_ids"]) for b in bs)

    plain = [{k: v[i:i + 32] for k, v in w.items()} for w in windows for i in range(0, len(w["row"]), 32)]
    assert padded(batches) < 0.7 * padded(plain)
    # Batch order is shuffled, not shortest-first.
    maxima = [max(len(x) for x in b["input_ids"]) for b in batches[:10]]
    assert maxima != sorted(maxima)


def test_progress_is_logged_during_an_epoch(caplog):
    caplog.set_level("INFO", logger="pipelines.train.loop")
    progress = Progress(epoch=1, epochs=3, steps=10, every=0.0)
    progress.update(batches=5, rows=160, loss=0.5)
    assert "epoch 2/3: batch 5/10 (50%), mean loss 0.5000" in caplog.text
    quiet = Progress(epoch=0, epochs=1, steps=10, every=3600.0)
    caplog.clear()
    quiet.update(batches=1, rows=32, loss=1.0)
    assert caplog.text == ""


def _prepare(tmp_path, tokenizer, *overrides):
    from pipelines.train.data import prepare_data

    cfg = load_config(TrainConfig, None, [f"heads={HEADS}", *overrides])
    data = prepare_data(cfg, tokenizer, f" {tokenizer.sep_token} ")
    tables = {split: pa.concat_tables(getattr(data, split).parts) for split in ("train", "validation")}
    return data, tables


def test_preparation_in_small_pieces_gives_the_same_data(tmp_path, tokenizer, monkeypatch):
    import pipelines.train.data as train_data

    rows = make_rows(90, 7).to_pylist()
    rows[4]["text"] = None
    rows[50]["text"] = "  "
    rows[60]["sentiment"] = None
    schema = make_rows(1, 0).schema
    pq.write_table(pa.Table.from_pylist(rows[:55], schema=schema), tmp_path / "a.parquet")
    pq.write_table(pa.Table.from_pylist(rows[55:], schema=schema), tmp_path / "b.parquet")
    args = [f"train=[{tmp_path / 'a.parquet'},{tmp_path / 'b.parquet'}]", "validation_fraction=0.3", "max_train_rows=80"]
    whole, whole_tables = _prepare(tmp_path, tokenizer, *args)
    monkeypatch.setattr(train_data, "CHUNK_ROWS", 7)
    pieces, piece_tables = _prepare(tmp_path, tokenizer, *args)
    assert len(pieces.train.parts) > 5 and len(whole.train.parts) == 2
    for split in ("train", "validation"):
        assert piece_tables[split].equals(whole_tables[split])
        assert piece_tables[split].column("row").to_pylist() == list(range(getattr(whole, split).rows))
    assert whole.train.rows + whole.validation.rows + sum(whole.skipped_rows.values()) == 80
    assert sum(whole.skipped_rows.values()) == 2
    assert pieces.label_rows == whole.label_rows and pieces.skipped_rows == whole.skipped_rows
    assert whole.label_rows["sentiment"]["train"] + whole.label_rows["sentiment"]["validation"] == 77
    assert [s.to_dict() for s in pieces.specs] == [s.to_dict() for s in whole.specs]
    assert isinstance(whole.specs[0].class_weights, list)


def test_label_errors_name_the_row_of_the_file_when_read_in_pieces(tmp_path, tokenizer, monkeypatch):
    import pipelines.train.data as train_data

    rows = make_rows(30, 8).to_pylist()
    rows[23]["sentiment"] = "meh"
    pq.write_table(pa.Table.from_pylist(rows, schema=make_rows(1, 0).schema), tmp_path / "t.parquet")
    monkeypatch.setattr(train_data, "CHUNK_ROWS", 5)
    heads = 'heads=[{name: sentiment, kind: multiclass, labels: [pos, neg]}]'
    with pytest.raises(InputError, match=r"t.parquet', column 'sentiment': head 'sentiment': row 23: label 'meh'"):
        from pipelines.train.data import prepare_data

        cfg = load_config(TrainConfig, None, [f"train=[{tmp_path / 't.parquet'}]", heads])
        prepare_data(cfg, tokenizer, " [SEP] ")
