"""Cached-feature training for a frozen encoder (pipelines/train/features.py)."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from safetensors.torch import load_file

from pipelines.config import ConfigError, load_config
from pipelines.train.config import TrainConfig
from pipelines.actor import read_tokens
from tests.pipelines.test_training import make_rows, train

# Dropout in both heads and fusion of the first head's probabilities into the second: the cached
# run must reproduce both. The tiny encoder has dropout 0.1 too, which a frozen encoder must not use.
FUSED_HEADS = json.dumps([{"name": "sentiment", "kind": "multiclass", "dropout": 0.3},
                          {"name": "topics", "kind": "multilabel", "hidden_sizes": [8], "dropout": 0.3, "inputs_from": ["sentiment"]}])


@pytest.mark.slow
def test_cached_features_train_the_heads_as_the_encoder_would(tmp_path, tiny_encoder_dir, ray_local, monkeypatch):
    import pipelines.train.data as train_data

    monkeypatch.setattr(train_data, "CHUNK_ROWS", 50)  # several blocks: the batches must still match
    pq.write_table(make_rows(160, 1), tmp_path / "train.parquet")
    pq.write_table(make_rows(60, 2), tmp_path / "val.parquet")
    args = [f"train=[{tmp_path / 'train.parquet'}]", f"validation=[{tmp_path / 'val.parquet'}]", f"heads={FUSED_HEADS}",
            "freeze_encoder=true", "epochs=2", "learning_rate=0.01", "seed=3"]
    cached = train(tmp_path / "cached", tiny_encoder_dir, *args)
    uncached = train(tmp_path / "uncached", tiny_encoder_dir, *args, "cache_features=false")

    assert cached["feature_cache"]["rows"] == 220 and cached["feature_cache"]["seconds"] > 0
    assert uncached["feature_cache"] is None
    assert cached["optimizer_steps"] == uncached["optimizer_steps"] == 2 * 10
    for got, want in zip(cached["epochs"], uncached["epochs"], strict=True):
        for key, value in want.items():
            if key != "train_examples_per_s":
                assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
    assert cached["tuned_thresholds"]["topics"]["thresholds"] == uncached["tuned_thresholds"]["topics"]["thresholds"]
    # The temperature is the minimum of a nearly flat 1-D NLL: logits equal to ~1e-6 (another batching
    # of the same rows) move it by up to a few 1e-4 (2.4e-4 seen on a loaded 2-core machine).
    assert cached["temperatures"] == pytest.approx(uncached["temperatures"], rel=2e-3)

    weights = {run: load_file(tmp_path / run / "model" / "model.safetensors") for run in ("cached", "uncached")}
    assert weights["cached"].keys() == weights["uncached"].keys()
    for name, want in weights["uncached"].items():
        assert np.allclose(weights["cached"][name].numpy(), want.numpy(), rtol=1e-4, atol=1e-6), name
    # The export is the whole model, with the encoder exactly as it started.
    encoder = load_file(tiny_encoder_dir / "model.safetensors")
    exported = {k[len("encoder."):]: v for k, v in weights["cached"].items() if k.startswith("encoder.")}
    assert encoder.keys() == exported.keys()
    for name, want in encoder.items():
        assert np.array_equal(exported[name].numpy(), want.numpy()), name
    assert any(k.startswith("heads.") for k in weights["cached"])


def test_cache_features_is_validated_and_defaults_to_freeze_encoder():
    base = ["train=[x.parquet]", 'heads=[{name: h, kind: multiclass}]']
    with pytest.raises(ConfigError, match="key 'cache_features'.*freeze_encoder=true"):
        load_config(TrainConfig, None, [*base, "cache_features=true"])
    with pytest.raises(ConfigError, match="key 'cache_features'"):
        load_config(TrainConfig, None, [*base, "freeze_encoder=true", "cache_features=maybe"])
    assert load_config(TrainConfig, None, [*base, "freeze_encoder=true"]).cached
    assert not load_config(TrainConfig, None, [*base, "freeze_encoder=true", "cache_features=false"]).cached
    assert not load_config(TrainConfig, None, base).cached
    assert not load_config(TrainConfig, None, [*base, "cache_features=false"]).cached


def test_token_ids_of_a_sliced_arrow_column():
    column = pa.chunked_array([pa.array([[1, 2], [3], [4, 5, 6], [7]], pa.list_(pa.int32())).slice(1, 3)])
    tokens = read_tokens(column)
    assert [r.tolist() for r in tokens.rows()] == [[3], [4, 5, 6], [7]]
    assert tokens.lengths.tolist() == [1, 3, 1]
    picked = read_tokens(pa.array([[1, 2], None, [4, 5, 6]], pa.list_(pa.int32())), rows=[2, 1])
    assert [r.tolist() for r in picked.rows()] == [[4, 5, 6], []]
