"""from_embeddings=true (heads-only scoring on an earlier output's vectors) and the heads=[...] key."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.config import ConfigError, load_config
from pipelines.score import ScoreConfig, run_score
from pipelines.storage import InputError
from tests.conftest import ALL_KIND_HEADS, tiny_model

HIDDEN = 32  # tests/conftest.py's tiny encoder
TEMPERATURES = {"type": 1.7, "tags": 0.6, "topic": 1.3}  # calibrated heads: heads-only must calibrate alike
HEADS = [{**h, **({"temperature": TEMPERATURES[h["name"]]} if h["name"] in TEMPERATURES else {})} for h in ALL_KIND_HEADS]
TEXTS = ["the delivery was quick", "terrible quality, broke in a day", "great value for the money " * 3, "meh",
         "word " * 300]  # the last is longer than max_length: truncated


def score(tmp_path, model_dir, name, **overrides):
    args = {"output": str(tmp_path / name), "model": str(model_dir), "progress": False, "block_rows": 64,
            "max_tokens_per_batch": 256, "lock_timeout_s": 5, "precision": "fp32"}
    args.update(overrides)
    cfg = load_config(ScoreConfig, None, [f"{k}={v}" for k, v in args.items()])
    return run_score(cfg, inline=True)  # in this process, without Ray


def by_id(output):
    return pq.read_table(output).sort_by("id")


def probs(table, head):
    """A head's probabilities as a float array, for the rows that were scored."""
    ok = table.filter(table.column("error").is_null())
    return np.array(ok.column(f"{head}_probs").to_pylist(), dtype=np.float64)


def first_part(output):
    return sorted(Path(output).glob("part-*.parquet"))[0]


@pytest.fixture(scope="module")
def scored(tmp_path_factory, tokenizer):
    """A calibrated tiny model, and a text run with embeddings over 40 rows (3 without text) in 2 input files."""
    tmp = tmp_path_factory.mktemp("from_embeddings")
    model = tiny_model(HEADS)
    model.save_pretrained(tmp / "model")
    tokenizer.save_pretrained(tmp / "model")
    (tmp / "corpus").mkdir()
    ids = [f"row-{i:03d}" for i in range(40)]
    texts = [None if i in (5, 17) else "   " if i == 30 else TEXTS[i % len(TEXTS)] + f" #{i}" for i in range(40)]
    for k in range(2):
        part = slice(k * 20, (k + 1) * 20)
        pq.write_table(pa.table({"id": ids[part], "text": texts[part], "source": [f"s{k}"] * len(ids[part])}),
                       tmp / "corpus" / f"c{k}.parquet", row_group_size=8)
    manifest = score(tmp, tmp / "model", "text", input=str(tmp / "corpus"), embeddings="true", max_length=64,
                     passthrough_columns="[source]")
    assert manifest["rows_out"] == 40 and manifest["rows_error"] == 3 and manifest["rows_truncated"] > 0
    return tmp, tmp / "model", tmp / "text", ids


def test_heads_only_equals_the_text_run_and_every_id_comes_out_once(scored):
    tmp, model_dir, text_out, ids = scored
    manifest = score(tmp, model_dir, "heads", input=str(text_out), from_embeddings="true", passthrough_columns="[source]")
    text, heads = by_id(text_out), by_id(tmp / "heads")
    assert heads.column("id").to_pylist() == ids  # every id exactly once
    assert manifest["rows_in"] == manifest["rows_out"] == 40 and manifest["status"] == "complete"
    assert (tmp / "heads" / "_SUCCESS").exists()
    # The same schema as a text run without embeddings: pass-through, every head's columns, truncated, error.
    assert heads.schema.names == [n for n in text.schema.names if n != "embedding"]
    meta = json.loads(pq.read_schema(first_part(tmp / "heads")).metadata[b"mtcls"])
    assert meta["text_columns"] == ["text"] and "encoder" not in meta
    assert manifest["encoder"] == json.loads(pq.read_schema(first_part(text_out)).metadata[b"mtcls"])["encoder"]
    assert manifest["precision"]["used_this_run"] == {"fp32": manifest["precision"]["used_this_run"]["fp32"]}
    for spec in HEADS:
        np.testing.assert_allclose(probs(heads, spec["name"]), probs(text, spec["name"]), atol=1e-4, err_msg=spec["name"])
    for name in ("trust_label", "type_label", "tags_labels", "topic_economy_label", "sphere_set", "source"):
        assert heads.column(name).to_pylist() == text.column(name).to_pylist(), name
    # Truncation comes from the input; rows without a vector carry the input's error.
    assert heads.column("truncated").to_pylist() == text.column("truncated").to_pylist()
    errors = dict(zip(ids, heads.column("error").to_pylist()))
    given = dict(zip(ids, text.column("error").to_pylist()))
    assert {i for i, e in errors.items() if e} == {"row-005", "row-017", "row-030"}
    assert errors["row-005"] == f"no embedding: {given['row-005']}" and given["row-005"].startswith("empty text")
    # A rerun is a no-op: the commit and resume machinery is the text path's.
    again = score(tmp, model_dir, "heads", input=str(text_out), from_embeddings="true", passthrough_columns="[source]")
    assert again["rows_scored_this_run"] == 0 and again["rows_out"] == 40


def test_heads_subset_in_text_mode(scored):
    tmp, model_dir, text_out, ids = scored
    score(tmp, model_dir, "text-type", input=str(tmp / "corpus"), max_length=64, heads="[type]")
    full, sub = by_id(text_out), by_id(tmp / "text-type")
    # 'type' reads 'trust' (inputs_from): trust runs, but only type's columns are written.
    assert sub.schema.names == ["id", "type_label", "type_score", "type_probs", "truncated", "error"]
    assert [h["name"] for h in json.loads(sub.schema.metadata[b"mtcls"])["heads"]] == ["type"]
    assert sub.column("id").to_pylist() == ids
    np.testing.assert_allclose(probs(sub, "type"), probs(full, "type"), atol=1e-5)


def test_heads_only_from_a_list_column_without_status_columns_with_a_subset_and_vectors_copied(scored):
    tmp, model_dir, text_out, ids = scored
    text = by_id(text_out)
    vectors = text.column("embedding").to_pylist()
    vectors[3] = None  # a scored row whose vector went missing
    table = pa.table({"id": text.column("id"), "embedding": pa.array(vectors, pa.list_(pa.float32()))},
                     metadata=pq.read_schema(first_part(text_out)).metadata)
    (tmp / "lists").mkdir()
    pq.write_table(table, tmp / "lists" / "in.parquet")
    manifest = score(tmp, model_dir, "sub", input=str(tmp / "lists"), from_embeddings="true", heads="[tags,type]",
                     embeddings="true", embedding_dtype="float16")
    out = by_id(tmp / "sub")
    assert out.column("id").to_pylist() == ids and manifest["rows_error"] == 4
    assert [n for n in out.schema.names if n.endswith("_probs")] == ["type_probs", "tags_probs"]
    assert out.schema.field("embedding").type == pa.list_(pa.float16(), HIDDEN)
    errors = dict(zip(ids, out.column("error").to_pylist()))
    assert errors["row-003"] == "no embedding: 'embedding' is null in the input"
    assert errors["row-005"] == "no embedding: 'embedding' is null in the input"  # the input has no error column
    assert out.column("truncated").null_count == 40  # unknown: the input has no truncated column
    keep = np.array([i != "row-003" for i in ids])
    for head in ("type", "tags"):
        full = probs(text, head)[keep[np.array(text.column("error").is_null().to_pylist())]]
        np.testing.assert_allclose(probs(out, head), full, atol=1e-4, err_msg=head)
    copied = np.array([v for v in out.column("embedding").to_pylist() if v is not None], dtype=np.float32)
    original = np.array([v for i, v in enumerate(vectors) if v is not None], dtype=np.float32)
    np.testing.assert_allclose(copied, original, rtol=1e-3, atol=1e-3)
    meta = json.loads(pq.read_schema(first_part(tmp / "sub")).metadata[b"mtcls"])
    assert meta["encoder"] == manifest["encoder"] and meta["embedding"]["dtype"] == "float16"


def test_a_vector_of_the_wrong_width_fails_naming_the_file_and_the_row(scored):
    tmp, model_dir, text_out, _ = scored
    text = by_id(text_out)
    vectors = text.column("embedding").to_pylist()
    vectors[7] = vectors[7][:-1]
    (tmp / "short").mkdir()
    pq.write_table(pa.table({"id": text.column("id"), "embedding": pa.array(vectors, pa.list_(pa.float32()))},
                            metadata=pq.read_schema(first_part(text_out)).metadata), tmp / "short" / "in.parquet")
    with pytest.raises(InputError) as info:  # raised in the read stage; the job reports its one line
        score(tmp, model_dir, "short-out", input=str(tmp / "short"), from_embeddings="true")
    assert str(info.value) == (f"Parquet file '{tmp / 'short' / 'in.parquet'}', row 7 (id 'row-007'): its embedding has "
                               f"{HIDDEN - 1} values, but the model's encoder gives {HIDDEN}")
    assert not (tmp / "short-out" / "_SUCCESS").exists()


def write_variant(tmp, text_out, name, table_fn):
    table = pq.read_table(first_part(text_out))
    path = tmp / f"{name}.parquet"
    pq.write_table(table_fn(table), path)
    return path


def test_an_encoder_mismatch_is_refused_naming_both_hashes_and_nothing_is_written(scored, tokenizer):
    import mtcls

    tmp, model_dir, text_out, _ = scored
    other = tiny_model(HEADS, seed=1)  # same heads, other encoder weights
    other.save_pretrained(tmp / "other")
    tokenizer.save_pretrained(tmp / "other")
    recorded = json.loads(pq.read_schema(first_part(text_out)).metadata[b"mtcls"])["encoder"]["encoder_sha256"]
    expected = mtcls.encoder_identity(other)["encoder_sha256"]
    with pytest.raises(InputError) as info:
        score(tmp, tmp / "other", "mismatch", input=str(text_out), from_embeddings="true")
    assert recorded in str(info.value) and expected in str(info.value) and recorded != expected
    assert not (tmp / "mismatch").exists()


def test_inputs_without_vectors_or_identity_are_refused_naming_the_file(scored):
    tmp, model_dir, text_out, _ = scored
    no_column = write_variant(tmp, text_out, "no-column", lambda t: t.drop_columns(["embedding"]))
    with pytest.raises(InputError, match=r"no-column\.parquet.*has no column 'embedding'"):
        score(tmp, model_dir, "o1", input=str(no_column), from_embeddings="true")
    no_identity = write_variant(tmp, text_out, "no-identity", lambda t: t.replace_schema_metadata({}))
    with pytest.raises(InputError, match=r"no-identity\.parquet.*records no encoder identity"):
        score(tmp, model_dir, "o2", input=str(no_identity), from_embeddings="true")
    narrow = write_variant(tmp, text_out, "narrow", lambda t: t.set_column(
        t.schema.get_field_index("embedding"), pa.field("embedding", pa.list_(pa.float32(), 4)),
        pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(4 * t.num_rows, np.float32)), 4)).replace_schema_metadata(t.schema.metadata))
    with pytest.raises(InputError, match=r"narrow\.parquet', row 0 .*has 4 values, but the model's encoder gives 32"):
        score(tmp, model_dir, "o3", input=str(narrow), from_embeddings="true")
    with pytest.raises(ConfigError, match="key 'output'"):  # rescoring in place would delete the input
        score(tmp, model_dir, "text", input=str(text_out), from_embeddings="true")
    for name in ("o1", "o2", "o3"):
        assert not (tmp / name).exists()


def test_unknown_heads_fail_up_front_naming_the_key_and_the_known_heads(scored):
    tmp, model_dir, text_out, _ = scored
    for mode in ("false", "true"):
        with pytest.raises(ConfigError, match=r"key 'heads': unknown head\(s\) \['nope'\]; the model's heads: \['trust', 'type'"):
            score(tmp, model_dir, "unknown", input=str(text_out if mode == "true" else tmp / "corpus"), from_embeddings=mode,
                  heads="[type,nope]")
    assert not (tmp / "unknown").exists()


def test_config_validation():
    with pytest.raises(ConfigError, match="key 'precision'"):
        ScoreConfig(from_embeddings=True, precision="bf16")
    with pytest.raises(ConfigError, match="key 'num_gpus_per_actor'"):
        ScoreConfig(from_embeddings=True, num_gpus_per_actor=1)
    with pytest.raises(ConfigError, match="key 'heads'"):
        ScoreConfig(heads=["a", "a"])
    # No text is read: text_columns are not used, so a text column may be passed through.
    assert ScoreConfig(from_embeddings=True, text_columns=[], passthrough_columns=["text"]).passthrough_columns == ["text"]
    with pytest.raises(ConfigError, match="key 'passthrough_columns'"):
        ScoreConfig(passthrough_columns=["text"])


def test_heads_only_plans_cpu_actors_on_a_gpu_cluster():
    from pipelines.resources import plan_scoring

    cluster = {"CPU": 16.0, "GPU": 2.0}
    assert plan_scoring(ScoreConfig(), cluster).num_gpus == 1.0
    plan = plan_scoring(ScoreConfig(from_embeddings=True), cluster)
    assert plan.num_gpus == 0 and plan.num_actors == 15


def test_the_engine_runs_a_subset_of_heads_and_the_heads_alone_on_pooled_features(tokenizer):
    import mtcls

    model = tiny_model(HEADS)
    engine = mtcls.InferenceEngine(model, tokenizer, "fp32", device="cpu", max_tokens_per_batch=64)
    tokens = engine.tokenize([t + f" {i}" for i, t in enumerate(TEXTS * 3)])
    full = engine.predict_tokens(tokens, with_pooled=True)
    pooled = engine.predict_pooled(full.pooled, batch_rows=4)  # several batches of the heads
    assert set(pooled.probs) == set(full.probs) and pooled.pooled is None
    for name in pooled.probs:
        np.testing.assert_allclose(pooled.probs[name], full.probs[name], atol=1e-6, err_msg=name)
    # 'type' reads 'trust' (inputs_from): trust runs, only type comes back, with the full run's values.
    sub = mtcls.InferenceEngine(model, tokenizer, "fp32", device="cpu", max_tokens_per_batch=64, heads=["type"])
    assert list(sub.specs) == ["type"] and model.heads_needed(["type"]) == ["trust", "type"]
    for result in (sub.predict_tokens(tokens), sub.predict_pooled(full.pooled)):
        assert set(result.probs) == {"type"}
        np.testing.assert_allclose(result.probs["type"], full.probs["type"], atol=1e-6)
    with pytest.raises(ValueError, match=r"\(N, 32\)"):
        engine.predict_pooled(np.zeros((2, 31), np.float32))
