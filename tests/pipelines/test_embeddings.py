"""embeddings=true: the pooled encoder output as a fixed-size-list column, with the encoder's identity."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoTokenizer

import mtcls
from mtcls.quantize import int8_unavailable
from pipelines.config import ConfigError, load_config
from pipelines.inference import predict_with_retry
from pipelines.score import ScoreConfig, run_score
from tests.conftest import tiny_model

TEXTS = [
    "the delivery was quick",
    "terrible quality, broke in a day",
    "great value for the money and friendly staff " * 3,
    "meh",
    "word " * 400,  # longer than max_length: truncated
]
HIDDEN = 32  # tests/conftest.py's tiny encoder


def write_corpus(path, n=30):
    ids = [f"row-{i:05d}" for i in range(n)]
    texts = [TEXTS[i % len(TEXTS)] + f" #{i}" for i in range(n)]
    pq.write_table(pa.table({"id": ids, "text": texts}), path)
    return dict(zip(ids, texts))


def score(tmp_path, model_dir, name, **overrides):
    args = {"output": str(tmp_path / name), "model": str(model_dir), "progress": False, "block_rows": 16,
            "max_tokens_per_batch": 256, "lock_timeout_s": 5, "precision": "fp32"}
    args.update(overrides)
    cfg = load_config(ScoreConfig, None, [f"{k}={v}" for k, v in args.items()])
    return cfg, run_score(cfg, inline=True)  # in this process, without Ray


def pooled_directly(model, tokenizer, texts, max_length):
    """The model's own pooled output, one row at a time (no padding, no engine)."""
    rows = []
    with torch.no_grad():
        for text in texts:
            enc = tokenizer([text], truncation=True, max_length=max_length, return_tensors="pt")
            rows.append(model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).pooled[0].numpy())
    return np.stack(rows)


def embeddings_of(output, ids):
    table = pq.read_table(output)
    frame = table.select(["id", "embedding"]).to_pandas().set_index("id")
    return np.stack(frame.loc[ids, "embedding"].to_numpy()), table


def schema_meta(output):
    return json.loads(pq.read_schema(next(Path(output).glob("part-*.parquet"))).metadata[b"mtcls"])


def test_embedding_column_is_the_pooled_output_and_float16_halves_it(tmp_path, tiny_model_dir):
    texts = write_corpus(tmp_path / "in.parquet")
    ids = sorted(texts)
    model = mtcls.MultiTaskModel.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)

    cfg, manifest = score(tmp_path, tiny_model_dir, "f32", input=str(tmp_path / "in.parquet"), embeddings="true")
    got, table = embeddings_of(cfg.output, ids)
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), HIDDEN)
    assert table.schema.names[-3:] == ["embedding", "truncated", "error"]
    expected = pooled_directly(model, tokenizer, [texts[i] for i in ids], model.config.max_seq_length)
    assert got.shape == (len(ids), HIDDEN) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-5)
    # The encoder's identity, in the schema metadata and the manifest: the default max_length is the model's.
    identity = mtcls.encoder_identity(model)
    meta = schema_meta(cfg.output)
    assert meta["encoder"] == manifest["encoder"] == identity
    assert meta["embedding"] == {"column": "embedding", "dtype": "float32", "size": HIDDEN}
    assert manifest["schema"]["embedding"] == str(pa.list_(pa.float32(), HIDDEN))
    # pandas gives one float32 vector per row; polars reads the column as a fixed-size array.
    frame = pd.read_parquet(cfg.output)
    assert frame["embedding"].map(len).eq(HIDDEN).all()
    pl = pytest.importorskip("polars")
    assert pl.read_parquet(next(Path(cfg.output).glob("part-*.parquet")))["embedding"].dtype == pl.Array(pl.Float32, HIDDEN)

    cfg16, manifest16 = score(tmp_path, tiny_model_dir, "f16", input=str(tmp_path / "in.parquet"), embeddings="true",
                              embedding_dtype="float16", max_length=32)
    got16, table16 = embeddings_of(cfg16.output, ids)
    assert table16.schema.field("embedding").type == pa.list_(pa.float16(), HIDDEN) and got16.dtype == np.float16
    column32, column16 = table.column("embedding").combine_chunks(), table16.column("embedding").combine_chunks()
    assert column16.values.nbytes * 2 == column32.values.nbytes
    expected32 = pooled_directly(model, tokenizer, [texts[i] for i in ids], 32)
    np.testing.assert_allclose(got16.astype(np.float32), expected32, rtol=1e-3, atol=1e-3)
    assert schema_meta(cfg16.output)["embedding"]["dtype"] == "float16"
    assert pl.read_parquet(next(Path(cfg16.output).glob("part-*.parquet")))["embedding"].dtype == pl.Array(pl.Float16, HIDDEN)
    # The identity records the token limit the job used, not only the model's default.
    assert manifest16["encoder"] == {**identity, "max_length": 32}


def test_rows_with_an_error_have_null_embeddings(tiny_model_dir, tokenizer):
    """The inference actor called directly (no Ray): rows without text, and a row whose forward pass fails."""
    from pipelines.actor import InferenceActor, ScoredColumns
    from pipelines.artifacts import read_model_files
    from pipelines.blocks import IDS, PRECISION, PRECISION_TYPE
    from pipelines.sink.schema import embedding_type, output_schema
    from pipelines.tokenize import tokenize_block

    rows = pa.table({"id": ["ok", "null", "empty", "bad-ids", "also-ok"],
                     "text": ["fine text", None, "  ", "fine text too", "another fine text"]})
    block = tokenize_block(rows, ["id"], ["text"], " ", 64, tokenizer)
    ids = block.column(IDS).to_pylist()
    ids[3] = [101, 10 ** 6, 102]  # an id past the vocabulary: the forward pass fails, retried row by row
    block = block.set_column(block.schema.get_field_index(IDS), IDS, pa.array(ids, pa.list_(pa.int32())))
    model = mtcls.MultiTaskModel.from_pretrained(tiny_model_dir)
    schema = output_schema(model.config.head_specs(), pa.schema([("id", pa.string())]), {}, ["text"],
                           embedding=embedding_type(HIDDEN, "float32"))
    actor = InferenceActor([read_model_files(tiny_model_dir)], inputs="tokens",
                           output=ScoredColumns(pa.schema([*schema, pa.field(PRECISION, PRECISION_TYPE)])),
                           precision="fp32", max_length=64, torch_threads=1)
    out = actor(block).to_pandas().set_index("id")
    assert out.loc["bad-ids", "error"].startswith("inference failed")
    assert out.loc["null", "error"].startswith("empty text") and out.loc["empty", "error"].startswith("empty text")
    assert out.loc[["null", "empty", "bad-ids"], "embedding"].isna().all()
    assert out.loc[["ok", "also-ok"], "error"].isna().all()
    vectors = np.stack(out.loc[["ok", "also-ok"], "embedding"].to_numpy())
    expected = pooled_directly(model, tokenizer, ["fine text", "another fine text"], 64)
    assert vectors.shape == (2, HIDDEN) and np.allclose(vectors, expected, atol=1e-5)


def test_encoder_identity_ignores_heads_but_not_encoder_weights(tmp_path, tokenizer):
    pq.write_table(pa.table({"id": ["a", "b"], "text": ["fine text", "another one"]}), tmp_path / "in.parquet")
    model = tiny_model()
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    _, manifest = score(tmp_path, tmp_path / "base", "out-base", input=str(tmp_path / "in.parquet"), embeddings="true")
    assert schema_meta(tmp_path / "out-base")["encoder"] == manifest["encoder"] == mtcls.encoder_identity(model)
    # What the job records is mtcls.encoder_identity: a new head leaves it, an encoder weight changes it.
    base = mtcls.encoder_identity(model)
    model.add_head({"name": "extra", "kind": "multiclass", "labels": ["p", "q", "r"]})
    assert mtcls.encoder_identity(model) == base
    with torch.no_grad():
        next(model.encoder.parameters())[0, 0] += 1.0
    assert mtcls.encoder_identity(model)["encoder_sha256"] != base["encoder_sha256"]


def test_without_embeddings_the_schema_is_unchanged(tmp_path, tiny_model_dir):
    write_corpus(tmp_path / "in.parquet", 5)
    cfg, manifest = score(tmp_path, tiny_model_dir, "out", input=str(tmp_path / "in.parquet"))
    schema = pq.read_schema(next(Path(cfg.output).glob("part-*.parquet")))
    assert "embedding" not in schema.names and schema.names[-2:] == ["truncated", "error"]
    meta = schema_meta(cfg.output)
    assert "encoder" not in meta and "embedding" not in meta and "encoder" not in manifest


@pytest.mark.parametrize("value", ["float64", "bf16", "fp16"])
def test_bad_embedding_dtype_names_the_key(value):
    with pytest.raises(ConfigError, match="key 'embedding_dtype'"):
        load_config(ScoreConfig, None, ["embeddings=true", f"embedding_dtype={value}"])
    with pytest.raises(ConfigError, match="key 'embedding_dtype'"):
        ScoreConfig(embedding_dtype=value)


PRECISIONS = ["fp32", "bf16", pytest.param("int8", marks=pytest.mark.skipif(bool(int8_unavailable()), reason=str(int8_unavailable())))]


@pytest.mark.parametrize("precision", PRECISIONS)
def test_the_engine_returns_the_pooled_features_the_heads_saw(precision, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("MTCLS_CACHE", str(tmp_path / "cache"))
    model = tiny_model()
    engine = mtcls.InferenceEngine(model, tokenizer, precision, device="cpu", max_tokens_per_batch=64)
    tokens = engine.tokenize([t + f" {i}" for i, t in enumerate(TEXTS * 4)])
    plain = engine.predict_tokens(tokens)
    both = engine.predict_tokens(tokens, with_pooled=True)
    assert plain.pooled is None and set(both.probs) == set(plain.probs) == set(model.specs)
    assert both.pooled.shape == (len(tokens), HIDDEN) and both.pooled.dtype == np.float32
    for name in plain.probs:
        np.testing.assert_array_equal(both.probs[name], plain.probs[name], err_msg=name)
    # Input order, and exactly the features the heads were run on.
    heads = model.forward_heads(torch.from_numpy(both.pooled)).logits
    for name, spec in model.specs.items():
        probs = mtcls.modeling.head_probabilities(spec, heads[name].float()).detach().numpy()
        np.testing.assert_allclose(probs, plain.probs[name], atol=1e-2 if precision == "bf16" else 1e-5, err_msg=name)
    if precision == "fp32":
        texts = [t + f" {i}" for i, t in enumerate(TEXTS * 4)]
        np.testing.assert_allclose(both.pooled, pooled_directly(model, tokenizer, texts, engine.max_length), atol=1e-5)
    empty = engine.predict_tokens([], with_pooled=True)
    assert empty.pooled.shape == (0, HIDDEN)


def test_predict_with_retry_gives_failed_rows_nan_features(tokenizer):
    model = tiny_model()
    engine = mtcls.InferenceEngine(model, tokenizer, "fp32", device="cpu")
    rows = [[101, 2204, 102], [101] + [2204] * 198 + [102], [101, 2919, 102]]  # the middle row exceeds 160 positions
    out, failures = predict_with_retry(engine, mtcls.Tokens.from_rows(rows), with_pooled=True)
    assert [f is None for f in failures] == [True, False, True]
    assert np.isnan(out.pooled[1]).all() and np.isfinite(out.pooled[[0, 2]]).all()
    assert all(np.isnan(p[1]).all() and np.isfinite(p[[0, 2]]).all() for p in out.probs.values())
    alone = engine.predict_tokens([rows[2]], with_pooled=True)
    np.testing.assert_allclose(out.pooled[2], alone.pooled[0], atol=1e-6)
