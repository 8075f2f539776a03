"""precision=int8: the ONNX Runtime route in the engine, the jobs, and its errors before any work."""

import json
import sys

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoTokenizer

import mtcls
from mtcls.quantize import INT8_FILE
from pipelines.config import ConfigError, load_config
from pipelines.evaluate import EvalConfig
from pipelines.score import ScoreConfig, run_score
from pipelines.train import TrainConfig

TEXTS = [f"review {i}: " + "good value and quick delivery " * (i % 5) + "broke after a week" * (i % 3) for i in range(60)]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MTCLS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "int8"


def test_int8_engine_is_close_to_fp32_and_exports_once_per_model(tmp_path, tiny_model_dir, cache):
    model = mtcls.MultiTaskModel.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    fp32 = mtcls.InferenceEngine(model, tokenizer, "fp32", device="cpu").predict(TEXTS)[0]
    engine = mtcls.InferenceEngine(model, tokenizer, "int8")
    assert engine.device.type == "cpu" and engine.precision.quantized and engine.int8 is not None
    int8 = engine.predict(TEXTS)[0]
    exports = list(cache.glob(f"*/{INT8_FILE}"))
    assert len(exports) == 1
    for name in fp32:
        diff = np.abs(int8[name] - fp32[name])
        assert diff.max() < 0.05, name  # quantized: close, not equal
    assert any(np.abs(int8[n] - fp32[n]).max() > 0 for n in fp32)

    stamp = exports[0].stat().st_mtime_ns
    again = mtcls.InferenceEngine(mtcls.MultiTaskModel.from_pretrained(tiny_model_dir), tokenizer, "int8").predict(TEXTS)[0]
    assert exports[0].stat().st_mtime_ns == stamp and len(list(cache.glob(f"*/{INT8_FILE}"))) == 1
    for name in int8:
        np.testing.assert_array_equal(again[name], int8[name])

    # Every layer's feed-forward output projection stays fp32; the other MatMuls and attention are int8.
    import onnx

    graph = onnx.load(str(exports[0])).graph
    layers = model.encoder.config.num_hidden_layers
    kept = [n.name for n in graph.node if n.op_type == "MatMul" and "/output/dense/" in n.name and "/attention/" not in n.name]
    assert len(kept) == layers
    assert not [n.name for n in graph.node if n.op_type == "MatMul" and n.name not in kept and "/dense/" in n.name]
    assert sum(n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul", "QAttention") for n in graph.node) >= 2 * layers

    # Another encoder (other weights) gets its own export.
    other = mtcls.MultiTaskModel.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        next(other.encoder.parameters()).add_(0.01)
    mtcls.InferenceEngine(other, tokenizer, "int8")
    assert len(list(cache.glob(f"*/{INT8_FILE}"))) == 2


def test_scoring_job_at_int8_ships_the_export_and_records_it(tmp_path, tiny_model_dir, cache):
    table = pa.table({"id": [f"r{i}" for i in range(len(TEXTS))], "text": TEXTS})
    pq.write_table(table, tmp_path / "in.parquet", row_group_size=16)

    def score(out, precision):
        cfg = load_config(ScoreConfig, None, [f"input={tmp_path / 'in.parquet'}", f"output={tmp_path / out}", f"model={tiny_model_dir}",
                                              f"precision={precision}", "progress=false", "rows_per_file=20", "block_rows=16"])
        return run_score(cfg, inline=True), pd.read_parquet(tmp_path / out).set_index("id").sort_index()

    manifest, int8 = score("int8", "int8")
    _, fp32 = score("fp32", "fp32")
    assert manifest["rows_out"] == len(TEXTS) and int8.index.is_unique and set(int8.index) == set(table.column("id").to_pylist())
    assert list(manifest["precision"]["used_this_run"]) == ["int8"] and manifest["resources"]["num_gpus"] == 0
    commits = {json.loads(pq.read_schema(p).metadata[b"mtcls_commit"])["precision"][0]["name"] for p in (tmp_path / "int8").glob("*.parquet")}
    assert commits == {"int8"}
    assert len(list(cache.glob(f"*/{INT8_FILE}"))) == 1  # exported once, in the driver
    assert np.abs(int8["trust_score"] - fp32["trust_score"]).max() < 0.05
    assert (int8["trust_score"] != fp32["trust_score"]).any()


def test_int8_config_errors_name_the_key(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="key 'precision': int8 runs on CPU actors"):
        ScoreConfig(output=str(tmp_path), precision="int8", num_gpus_per_actor=1)
    with pytest.raises(ConfigError, match="inference precision"):
        TrainConfig(train=["x.parquet"], heads=[{"name": "a", "kind": "binary", "labels": ["n", "y"]}], precision="int8")
    # Without the int8 extra installed, the config fails and says what to install.
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    for make in (lambda: ScoreConfig(output=str(tmp_path), precision="int8"),
                 lambda: EvalConfig(output=str(tmp_path), precision="int8")):
        with pytest.raises(ConfigError, match=r"key 'precision': int8 cannot run on this machine: .*onnxruntime.*mtcls\[int8\]"):
            make()
    ScoreConfig(output=str(tmp_path), precision="bf16")  # other precisions need nothing more


def test_a_model_the_route_cannot_export_fails_before_any_output(tmp_path, tiny_model_dir, cache, monkeypatch):
    pq.write_table(pa.table({"id": ["a"], "text": ["hello"]}), tmp_path / "in.parquet")

    def refuse(*args, **kwargs):
        raise RuntimeError("Unsupported: an operator this encoder uses")

    monkeypatch.setattr(torch.onnx, "export", refuse)
    cfg = ScoreConfig(input=str(tmp_path / "in.parquet"), output=str(tmp_path / "out"), model=str(tiny_model_dir), precision="int8", progress=False)
    with pytest.raises(ConfigError, match="key 'precision': int8 cannot run with the model .*cannot be exported"):
        run_score(cfg)
    assert not (tmp_path / "out").exists() and not list(cache.glob(f"*/{INT8_FILE}"))


# ---------------------------------------------------------------- what an export is keyed by and records

def same_weights_other_config(model, **changes):
    """A model with ``model``'s weights (heads included) and an encoder config changed by ``changes``."""
    encoder = model.config.encoder_config()
    for key, value in changes.items():
        setattr(encoder, key, value)
    config = mtcls.MultiTaskConfig(encoder=encoder, heads=model.config.heads, pooling=model.config.pooling,
                                   max_seq_length=model.config.max_seq_length)
    other = mtcls.MultiTaskModel(config).eval()
    other.load_state_dict(model.state_dict())
    return other


@pytest.mark.parametrize("changes", [{"hidden_act": "relu"}, {"layer_norm_eps": 1e-5}, {"pad_token_id": 1}])
def test_the_encoder_config_changes_the_identity_and_the_cache_key(tiny_model_dir, changes):
    from mtcls.quantize import encoder_fingerprint

    model = mtcls.MultiTaskModel.from_pretrained(tiny_model_dir)
    other = same_weights_other_config(model, **changes)
    assert mtcls.encoder_weights_sha256(other) == mtcls.encoder_weights_sha256(model)
    mine, theirs = mtcls.encoder_identity(model), mtcls.encoder_identity(other)
    assert theirs["weights_sha256"] == mine["weights_sha256"] and theirs["config_sha256"] != mine["config_sha256"]
    assert theirs["encoder_sha256"] != mine["encoder_sha256"]
    assert encoder_fingerprint(other) != encoder_fingerprint(model)


def test_provenance_fields_and_a_reload_leave_the_identity(tmp_path, tiny_model_dir, tokenizer):
    from mtcls.quantize import encoder_fingerprint

    model = mtcls.MultiTaskModel.from_pretrained(tiny_model_dir)
    base = mtcls.encoder_identity(model)
    renamed = same_weights_other_config(model, architectures=["BertModel"], _name_or_path="/elsewhere",
                                        initializer_range=0.5, id2label={0: "a", 1: "b"})
    assert mtcls.encoder_identity(renamed) == base and encoder_fingerprint(renamed) == encoder_fingerprint(model)
    # Built on a saved encoder with from_encoder (its config then names its path and class), then saved and reloaded.
    model.encoder.save_pretrained(tmp_path / "encoder")
    built = mtcls.MultiTaskModel.from_encoder(tmp_path / "encoder", model.config.heads, pooling=model.config.pooling,
                                              max_seq_length=model.config.max_seq_length)
    built.save_pretrained(tmp_path / "built")
    assert mtcls.encoder_identity(built) == base == mtcls.encoder_identity(mtcls.MultiTaskModel.from_pretrained(tmp_path / "built"))


def test_library_versions_change_the_cache_key_not_the_identity(tiny_model_dir, monkeypatch):
    from mtcls import quantize

    model = mtcls.MultiTaskModel.from_pretrained(tiny_model_dir)
    key, identity = quantize.encoder_fingerprint(model), mtcls.encoder_identity(model)
    versions = quantize.runtime_versions()
    assert set(versions) == {"torch", "transformers", "onnx", "onnxruntime"} and versions["torch"] == torch.__version__
    for library in ("torch", "onnxruntime", "onnx"):
        monkeypatch.setattr(quantize, "runtime_versions", lambda: {**versions, library: "0.0.1"})
        assert quantize.encoder_fingerprint(model) != key, library
        assert mtcls.encoder_identity(model) == identity


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_model_dir):
    """The tiny model's int8 export in a cache of its own, and that cache (one export for the module's tests)."""
    from mtcls.quantize import cached_int8

    cache_dir = tmp_path_factory.mktemp("int8-cache")
    model = mtcls.MultiTaskModel.from_pretrained(tiny_model_dir)
    return cached_int8(model, cache_dir), cache_dir


def test_an_export_records_the_identity_it_was_exported_from(tiny_model_dir, exported):
    from mtcls.quantize import ROUTE_VERSION, encoder_fingerprint, int8_file_problem, read_int8_record, runtime_versions

    path, _ = exported
    model = mtcls.MultiTaskModel.from_pretrained(tiny_model_dir)
    record = read_int8_record(path)
    identity = mtcls.encoder_identity(model)
    assert record["fingerprint"] == encoder_fingerprint(model) == path.parent.name
    assert record["encoder_sha256"] == identity["encoder_sha256"] and record["pooling"] == identity["pooling"]
    assert record["route_version"] == ROUTE_VERSION and record["versions"] == runtime_versions()
    assert read_int8_record(path.read_bytes()) == record and int8_file_problem(path, model) is None
    assert "another encoder" in int8_file_problem(path, same_weights_other_config(model, hidden_act="relu"))


def test_a_cached_file_of_other_weights_or_without_a_record_is_exported_again(tiny_model_dir, exported, caplog):
    import onnx

    from mtcls.quantize import cached_int8, encoder_fingerprint, int8_file_problem, read_int8_record

    path, cache_dir = exported
    other = mtcls.MultiTaskModel.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        next(other.encoder.parameters()).add_(0.01)
    planted = cache_dir / encoder_fingerprint(other) / INT8_FILE
    planted.parent.mkdir()
    planted.write_bytes(path.read_bytes())  # another encoder's export where this one's belongs
    assert int8_file_problem(planted, other) is not None
    with caplog.at_level("WARNING", logger="mtcls.quantize"):
        got = cached_int8(other, cache_dir)
    assert got == planted and "was not exported from this encoder" in caplog.text
    assert read_int8_record(got)["fingerprint"] == encoder_fingerprint(other) and int8_file_problem(got, other) is None
    assert got.read_bytes() != path.read_bytes()

    # A file that records nothing (as written before exports recorded their identity) is not trusted either.
    proto = onnx.load(str(got))
    del proto.metadata_props[:]
    onnx.save(proto, str(got))
    assert read_int8_record(got) is None
    assert read_int8_record(cached_int8(other, cache_dir))["fingerprint"] == encoder_fingerprint(other)
    # The matching cached file is used as it is.
    stamp = path.stat().st_mtime_ns
    assert cached_int8(mtcls.MultiTaskModel.from_pretrained(tiny_model_dir), cache_dir) == path and path.stat().st_mtime_ns == stamp


def test_a_shipped_int8_file_is_used_only_for_the_encoder_it_records(tmp_path, tiny_model_dir, exported, cache):
    import shutil

    from pipelines.inference import shipped_model_files
    from pipelines.storage import InputError

    path, _ = exported
    mine = tmp_path / "mine"
    shutil.copytree(tiny_model_dir, mine)
    shutil.copyfile(path, mine / INT8_FILE)
    files = shipped_model_files(mine, "int8")
    assert files[INT8_FILE] == path.read_bytes() and not cache.exists()  # shipped: nothing exported

    # The same file in the directory of a model whose encoder config differs (same weights): refused, naming the file.
    model = mtcls.MultiTaskModel.from_pretrained(tiny_model_dir)
    theirs = tmp_path / "theirs"
    same_weights_other_config(model, layer_norm_eps=1e-5).save_pretrained(theirs)
    shutil.copyfile(path, theirs / INT8_FILE)
    with pytest.raises(InputError, match=rf"{theirs / INT8_FILE}.*exported from another encoder.*differing: config.*delete"):
        shipped_model_files(theirs, "int8")
    # A file that does not say what it holds: refused too.
    (theirs / INT8_FILE).write_bytes(b"not an onnx model")
    with pytest.raises(InputError, match="records no encoder identity"):
        shipped_model_files(theirs, "int8")
    assert INT8_FILE in shipped_model_files(theirs, "fp32")  # other precisions do not read it
    assert not cache.exists()
    # The library's engine checks the same: the file in the model directory, and one passed in.
    shutil.copyfile(path, theirs / INT8_FILE)
    with pytest.raises(ValueError, match=r"int8 file .*exported from another encoder"):
        mtcls.InferenceEngine.load(theirs, with_tokenizer=False, precision="int8")
    with pytest.raises(ValueError, match=r"int8 file .*exported from another encoder"):
        mtcls.InferenceEngine(mtcls.MultiTaskModel.from_pretrained(theirs), None, "int8", int8_file=path)
    assert mtcls.InferenceEngine.load(mine, precision="int8").int8 is not None
    assert not cache.exists()
