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


def test_scoring_job_at_int8_ships_the_export_and_records_it(tmp_path, tiny_model_dir, ray_local, cache):
    table = pa.table({"id": [f"r{i}" for i in range(len(TEXTS))], "text": TEXTS})
    pq.write_table(table, tmp_path / "in.parquet", row_group_size=16)

    def score(out, precision):
        cfg = load_config(ScoreConfig, None, [f"input={tmp_path / 'in.parquet'}", f"output={tmp_path / out}", f"model={tiny_model_dir}",
                                              f"precision={precision}", "progress=false", "rows_per_file=20", "block_rows=16"])
        return run_score(cfg), pd.read_parquet(tmp_path / out).set_index("id").sort_index()

    manifest, int8 = score("int8", "int8")
    _, fp32 = score("fp32", "fp32")
    assert manifest["rows_out"] == len(TEXTS) and int8.index.is_unique and set(int8.index) == set(table.column("id").to_pylist())
    assert list(manifest["precision"]["used_this_run"]) == ["int8"] and manifest["resources"]["num_gpus"] == 0
    commits = {json.loads(pq.read_schema(p).metadata[b"mtcls_commit"])["precision"].split("\t")[0] for p in (tmp_path / "int8").glob("*.parquet")}
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
