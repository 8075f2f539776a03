"""Model directories are published whole: no file of an earlier model stays, a reader never sees a mix."""

import errno
import json
import threading
import time

import fsspec
import pytest
from safetensors import safe_open

import mtcls
from jobs import train as train_job
from mtcls.profile import reference_document
from pipelines import artifacts
from pipelines.artifacts import check_model_target, export_model, localize_model, publish_model_dir
from pipelines.storage import InputError
from pipelines.train.run import export_trained_model
from tests.conftest import ALL_KIND_HEADS, tiny_model

FIRST = [h for h in ALL_KIND_HEADS if h["name"] in ("trust", "type")]
SECOND = [h for h in ALL_KIND_HEADS if h["name"] in ("tags", "sphere")]


@pytest.fixture(params=["exchange", "rename"])
def swap(request, monkeypatch):
    """Both local swaps: renameat2(RENAME_EXCHANGE), and the fallback where the call is unavailable."""
    if request.param == "rename":
        def unavailable(a, b):
            raise OSError(errno.ENOSYS, "renameat2 is not available")

        monkeypatch.setattr(artifacts, "rename_exchange", unavailable)
    return request.param


def saved(path, heads, tokenizer, seed=0):
    tiny_model(heads=heads, seed=seed).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def summary_of(heads):
    return {"epochs": [{"epoch": e, **{f"{h['name']}_train_loss": 1.0 / (e + 1) for h in heads},
                        **{f"{h['name']}_macro_f1": 0.5 + e / 10 for h in heads}} for e in range(2)]}


def test_a_second_export_leaves_no_file_of_the_first(tmp_path, tokenizer, swap):
    tok = tmp_path / "tok"
    tokenizer.save_pretrained(tok)
    target = tmp_path / "model"
    for n, heads in enumerate((FIRST, SECOND)):
        export_trained_model(str(target), tiny_model(heads=heads), tok, summary_of(heads), reference_document({}, "test"),
                             [h["name"] for h in heads], tmp_path / f"staging{n}")
        files = sorted(p.name for p in target.iterdir())
        plots = sorted(f"{h['name']}_training.png" for h in heads)
        assert files == sorted(["config.json", "model.safetensors", "reference_profile.json", "training_summary.json",
                                "tokenizer.json", "tokenizer_config.json", *plots]), files
    assert not (target / "trust_training.png").exists() and not (target / "type_training.png").exists()
    assert list(mtcls.MultiTaskModel.from_pretrained(target).specs) == ["tags", "sphere"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "staging0", "staging1", "tok"]  # no staging or old copy beside it


def test_only_a_directory_mtcls_wrote_is_replaced(tmp_path, tiny_model_dir):
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "todo.txt").write_text("keep me")
    with pytest.raises(InputError, match=rf"model output '{mine}' exists and is not an mtcls model directory.*no config.json"):
        export_model(tiny_model_dir, str(mine))
    (mine / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(InputError, match="model_type 'bert', not 'mtcls'"):
        check_model_target(str(mine))
    (mine / "config.json").unlink()
    (mine / "sub").mkdir()
    (mine / "config.json").write_text(json.dumps({"model_type": "mtcls"}))
    with pytest.raises(InputError, match=r"holds directories \['sub'\]"):
        check_model_target(str(mine))
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="is a file"):
        check_model_target(str(tmp_path / "file"))
    assert (mine / "todo.txt").read_text() == "keep me" and sorted(p.name for p in mine.iterdir()) == ["config.json", "sub", "todo.txt"]
    # The training job refuses it before any training (no Ray is started for it).
    with pytest.raises(InputError, match=f"model output '{mine}' exists"):
        train_job.main([f"output={mine}", f"train=[{tmp_path / 'absent.parquet'}]", 'heads=[{name: h, kind: binary, labels: [a, b]}]'])
    # An empty directory, or none, is fine.
    (tmp_path / "empty").mkdir()
    export_model(tiny_model_dir, str(tmp_path / "empty"))
    assert (tmp_path / "empty" / "model.safetensors").is_file()


def test_an_object_store_export_removes_the_earlier_models_files(tmp_path, tokenizer):
    first, second = saved(tmp_path / "a", FIRST, tokenizer), saved(tmp_path / "b", SECOND, tokenizer)
    (first / "only_in_first.json").write_text("{}")
    target = "memory://mtcls-export-test/model"
    fs = fsspec.filesystem("memory")
    try:
        publish_model_dir(first, target)
        assert fs.exists("/mtcls-export-test/model/only_in_first.json")
        publish_model_dir(second, target)
        names = sorted(p.rsplit("/", 1)[1] for p in fs.ls("/mtcls-export-test/model", detail=False))
        assert names == sorted(p.name for p in second.iterdir())
        assert json.loads(fs.cat("/mtcls-export-test/model/config.json"))["heads"][0]["name"] == "tags"
    finally:
        fs.rm("/mtcls-export-test", recursive=True)


def heads_in(model_dir):
    """(heads in config.json, heads in model.safetensors, tokenizer present) of one loaded directory."""
    config = [h["name"] for h in json.loads((model_dir / "config.json").read_text())["heads"]]
    with safe_open(str(model_dir / "model.safetensors"), "np") as f:
        weights = sorted({k.split(".")[1][2:] for k in f.keys() if k.startswith("heads.")})
    return config, weights, (model_dir / "tokenizer.json").is_file()


def test_a_reader_loading_during_exports_never_sees_a_mixed_model(tmp_path, tokenizer, swap):
    sources = [saved(tmp_path / "a", FIRST, tokenizer), saved(tmp_path / "b", SECOND, tokenizer, seed=1)]
    target = tmp_path / "model"
    publish_model_dir(sources[0], str(target))
    done, errors = threading.Event(), []

    def export():
        try:
            for n in range(24):
                publish_model_dir(sources[(n + 1) % 2], str(target))
        except Exception as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)
        finally:
            done.set()

    writer = threading.Thread(target=export)
    writer.start()
    seen, loads = set(), 0
    deadline = time.monotonic() + 60
    while not done.is_set() and time.monotonic() < deadline:
        snapshot = localize_model(str(target))
        config, weights, tokenizer_there = heads_in(snapshot)
        assert sorted(config) == weights and tokenizer_there, (config, weights)
        # Later reads of the same snapshot still give the same model.
        assert heads_in(snapshot)[0] == config
        seen.add(tuple(config))
        loads += 1
    writer.join()
    assert not errors, errors
    assert loads >= 5 and len(seen) == 2, (loads, seen)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "model"]
