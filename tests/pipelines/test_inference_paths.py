"""One inference engine: the notebook API, the scoring job and the evaluation job agree exactly."""

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoTokenizer

import mtcls
from pipelines.evaluate import EvalConfig, run_evaluate
from pipelines.score import ScoreConfig, run_score

TEXTS = ["the delivery was quick", "terrible quality, broke in a day", "great value for the money and friendly staff",
         "meh", "an opinion piece about markets and politics today", "buy now!!! limited offer"]


@pytest.fixture(scope="module")
def ray_with_a_gpu():
    """A local Ray that advertises one GPU (the machine has none: actors see the GPU id, torch runs on CPU)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_notebook_scoring_and_evaluation_use_the_same_probabilities(tmp_path, tiny_model_dir, ray_with_a_gpu):
    n = len(TEXTS)
    table = pa.table({"id": [f"r{i}" for i in range(n)], "text": TEXTS,
                      "type": ["news", "opinion", "ad", "news", "opinion", "ad"],
                      "tags": [["x"], [], ["y", "z"], ["x", "z"], ["z"], []]})
    pq.write_table(table, tmp_path / "labelled.parquet")
    model = mtcls.MultiTaskModel.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    notebook = mtcls.InferenceEngine(model, tokenizer, "fp32", max_tokens_per_batch=4096).predict(TEXTS)[0]

    manifest = run_score(ScoreConfig(input=str(tmp_path / "labelled.parquet"), output=str(tmp_path / "scores"),
                                     model=str(tiny_model_dir), precision="fp32", progress=False, num_gpus_per_actor=0))
    scored = pd.read_parquet(tmp_path / "scores").set_index("id").loc[table.column("id").to_pylist()]
    assert manifest["rows_out"] == n
    for name, spec in model.specs.items():
        written = np.stack([np.stack(v) if isinstance(v[0], np.ndarray) else v for v in scored[f"{name}_probs"]])
        expected = spec.impl.full_probabilities(spec, notebook[name])
        np.testing.assert_array_equal(written.astype(np.float32).reshape(expected.shape), expected, err_msg=name)

    report = run_evaluate(EvalConfig(data=str(tmp_path / "labelled.parquet"), model=str(tiny_model_dir), precision="fp32",
                                     output=str(tmp_path / "report"), plots=False, progress=False))
    for head in ("type", "tags"):
        spec = model.specs[head]
        labels = mtcls.encode_labels(spec, table.column(head).to_pylist())
        expected = mtcls.head_report(spec, mtcls.head_statistics(spec, labels, notebook[head]))
        assert report["heads"][head] == expected, head
    # The evaluation actors asked Ray for the cluster's GPU (torch falls back to the CPU here).
    assert report["devices"] == [{"ray_gpu_ids": ["0"], "torch": "cpu", "precision": "fp32", "precision_reason": "set in the config"}]


def test_the_engine_puts_the_model_on_the_gpu_when_torch_has_one(monkeypatch, tokenizer):
    from tests.conftest import tiny_model

    model = tiny_model()
    moved = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(model, "to", lambda device: moved.append(str(device)) or model)
    engine = mtcls.InferenceEngine(model, tokenizer, precision="auto")
    assert moved == ["cuda"] and engine.device.type == "cuda"
    assert (engine.precision.name, engine.precision.autocast_dtype) == ("bf16", torch.bfloat16)
    assert engine.max_tokens == mtcls.inference.DEFAULT_MAX_TOKENS["cuda"]
