import json

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModel

import mtcls
from mtcls import HeadSpecError, MultiTaskModel
from tests.conftest import ALL_KIND_HEADS, tiny_model


def batch(n=6, t=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 2000, (n, t), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    return ids, mask


def random_labels(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    soft = torch.rand(n, 3, generator=g)
    return {
        "trust": torch.randint(0, 2, (n,), generator=g).float(),
        "type": torch.randint(0, 3, (n,), generator=g),
        "tags": torch.randint(0, 2, (n, 3), generator=g).float(),
        "topic": torch.randint(0, 4, (n, 2), generator=g),
        "sphere": soft / soft.sum(-1, keepdim=True),
    }


def test_forward_shapes_for_every_kind():
    ids, mask = batch()
    out = tiny_model()(ids, mask, labels=random_labels())
    shapes = {k: tuple(v.shape) for k, v in out.logits.items()}
    assert shapes == {"trust": (6, 1), "type": (6, 3), "tags": (6, 3), "topic": (6, 2, 4), "sphere": (6, 3)}
    assert set(out.head_losses) == set(shapes)
    weights = {h["name"]: 1.0 for h in ALL_KIND_HEADS}
    assert torch.allclose(out.loss, sum(weights[k] * v for k, v in out.head_losses.items()))


def test_save_and_reload_gives_identical_logits_without_code_or_pickle(tmp_path):
    model = tiny_model(pooling="cls")
    model.save_pretrained(tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["config.json", "model.safetensors"]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "mtcls" and "auto_map" not in config
    assert AutoConfig.from_pretrained(tmp_path).pooling == "cls"
    for cls in (MultiTaskModel, AutoModel):
        loaded = cls.from_pretrained(tmp_path).eval()
        assert isinstance(loaded, MultiTaskModel)
        ids, mask = batch()
        with torch.no_grad():
            a, b = model(ids, mask).logits, loaded(ids, mask).logits
        for name in a:
            assert torch.equal(a[name], b[name]), name
        assert loaded.specs == model.specs


def test_unlabelled_rows_do_not_contribute_to_the_loss():
    model = tiny_model()
    ids, mask = batch()
    labels = random_labels()
    missing = {k: v.clone() for k, v in labels.items()}
    for k in missing:
        missing[k][3:] = mtcls.IGNORE_INDEX
    full = model(ids[:3], mask[:3], labels={k: v[:3] for k, v in labels.items()})
    masked = model(ids, mask, labels=missing)
    for name in labels:
        assert torch.allclose(full.head_losses[name], masked.head_losses[name], atol=1e-6), name


def test_a_head_with_no_labels_in_the_batch_has_zero_loss_but_a_gradient_path():
    model = tiny_model()
    ids, mask = batch()
    labels = random_labels()
    labels["type"][:] = mtcls.IGNORE_INDEX
    out = model(ids, mask, labels=labels)
    assert out.head_losses["type"].item() == 0.0
    out.loss.backward()
    grad = model.heads["h_type"].net[-1].weight.grad
    assert grad is not None and torch.count_nonzero(grad) == 0


def test_fusion_head_sees_the_source_head_probabilities():
    model = tiny_model()
    ids, mask = batch()
    with torch.no_grad():
        before = model(ids, mask).logits
        model.heads["h_trust"].net[-1].bias += 3.0
        after = model(ids, mask).logits
    assert not torch.allclose(before["type"], after["type"])  # reads trust
    assert torch.equal(before["tags"], after["tags"])  # does not


def test_add_head_keeps_existing_weights_and_freezing_stops_updates():
    model = tiny_model(heads=ALL_KIND_HEADS[:2])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.add_head({"name": "sentiment", "kind": "multiclass", "labels": ["pos", "neg", "neu"], "inputs_from": ["type"]})
    for k, v in state.items():
        assert torch.equal(model.state_dict()[k], v), k
    assert [h["name"] for h in model.config.heads] == ["trust", "type", "sentiment"]
    with pytest.raises(HeadSpecError, match="duplicate head name 'trust'"):
        model.add_head(ALL_KIND_HEADS[0])

    model.train()
    model.freeze_encoder()
    model.freeze_heads(["trust"])
    ids, mask = batch()
    labels = {"trust": torch.ones(6), "type": torch.zeros(6, dtype=torch.long), "sentiment": torch.ones(6, dtype=torch.long)}
    model(ids, mask, labels=labels).loss.backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert all(p.grad is None for p in model.heads["h_trust"].parameters())
    assert model.heads["h_sentiment"].net[-1].weight.grad is not None
    with pytest.raises(HeadSpecError, match="no head named 'nope'"):
        model.freeze_heads(["nope"])


def test_balanced_weights_must_be_resolved_before_training():
    heads = [{"name": "c", "kind": "multiclass", "labels": ["a", "b"], "class_weights": "balanced"}]
    model = tiny_model(heads=heads)
    ids, mask = batch()
    model(ids, mask)  # inference is fine
    with pytest.raises(HeadSpecError, match="'c'.*'balanced' / 'sqrt_balanced' weights must be resolved"):
        model(ids, mask, labels={"c": torch.zeros(6, dtype=torch.long)})
    with pytest.raises(HeadSpecError, match="unknown head"):
        tiny_model()(ids, mask, labels={"nope": torch.zeros(6)})


def test_training_every_head_kind_reduces_the_loss():
    model = tiny_model(seed=1).train()
    ids, mask = batch(n=16, seed=3)
    labels = random_labels(n=16, seed=3)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(60):
        out = model(ids, mask, labels=labels)
        first = first if first is not None else {k: v.item() for k, v in out.head_losses.items()}
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    last = {k: v.item() for k, v in model(ids, mask, labels=labels).head_losses.items()}
    for name in first:
        assert last[name] < 0.5 * first[name], (name, first[name], last[name])


def test_set_head_spec_changes_thresholds_only():
    model = tiny_model()
    spec = model.specs["tags"]
    new = mtcls.HeadSpec.from_dict({**spec.to_dict(), "thresholds": [0.1, 0.2, 0.3]})
    model.set_head_spec(new)
    assert model.config.head("tags").thresholds == [0.1, 0.2, 0.3]
    with pytest.raises(HeadSpecError, match="'labels' cannot change"):
        model.set_head_spec(mtcls.HeadSpec.from_dict({**spec.to_dict(), "labels": ["x", "y", "w"]}))


def test_predict_texts_matches_a_plain_forward(tokenizer):
    model = tiny_model()
    texts = ["short text", "a much longer text " * 20, "mid length text here"]
    cols = mtcls.predict_texts(model, tokenizer, texts, max_length=32, max_tokens_per_batch=64)
    assert cols["truncated"].tolist() == [False, True, False]
    for i, text in enumerate(texts):
        enc = tokenizer([text], truncation=True, max_length=32, return_tensors="pt")
        with torch.no_grad():
            probs = torch.softmax(model(enc["input_ids"], enc["attention_mask"]).logits["type"], -1)
        np.testing.assert_allclose(cols["type_probs"][i], probs[0].numpy(), atol=1e-5)
    assert set(cols) - {"truncated"} == {c for s in model.specs.values() for c, _ in mtcls.output_columns(s)}


@pytest.mark.slow
def test_packaged_minilm_end_to_end(tmp_path, tokenizer):
    model = MultiTaskModel.from_encoder(mtcls.default_encoder_path(), ALL_KIND_HEADS).eval()
    assert model.config.hidden_size == 384
    texts = ["I love this phone", "Terrible service, never again"]
    cols = mtcls.predict_texts(model, tokenizer, texts)
    model.save_pretrained(tmp_path)
    again = mtcls.predict_texts(AutoModel.from_pretrained(tmp_path), tokenizer, texts)
    for key, value in cols.items():
        np.testing.assert_array_equal(np.asarray(value, dtype=object), np.asarray(again[key], dtype=object))
    # The pretrained encoder weights were loaded, not re-initialised by the wrapper.
    reference = AutoModel.from_pretrained(str(mtcls.default_encoder_path()))
    assert torch.equal(reference.embeddings.word_embeddings.weight, model.encoder.embeddings.word_embeddings.weight)


def test_class_and_positive_weights_survive_save_and_load(tmp_path):
    heads = [
        {"name": "c", "kind": "multiclass", "labels": ["a", "b", "d"], "class_weights": [0.5, 2.0, 1.5]},
        {"name": "m", "kind": "multilabel", "labels": ["x", "y"], "pos_weight": [3.0, 0.25]},
        {"name": "b", "kind": "binary", "labels": ["n", "p"], "pos_weight": 4.0},
    ]
    tiny_model(heads=heads).save_pretrained(tmp_path)
    loaded = MultiTaskModel.from_pretrained(tmp_path)
    assert loaded._class_weights_c.tolist() == [0.5, 2.0, 1.5]
    assert loaded._pos_weight_m.tolist() == [3.0, 0.25]
    assert loaded._pos_weight_b.tolist() == [4.0]
    ids, mask = batch()
    labels = {"m": torch.ones(6, 2), "c": torch.zeros(6, dtype=torch.long)}
    assert torch.isfinite(loaded(ids, mask, labels=labels).loss)
