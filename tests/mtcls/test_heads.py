import pytest

from mtcls import HeadSpec, HeadSpecError, MultiTaskConfig, validate_heads
from tests.conftest import ALL_KIND_HEADS, tiny_encoder_config


def make(**overrides):
    data = {"name": "h", "kind": "multiclass", "labels": ["a", "b", "c"]}
    data.update(overrides)
    return HeadSpec.from_dict(data)


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"kind": "regression"}, ["'h'", "'kind'", "'regression'"]),
        ({"labels": ["a", "b", "a"]}, ["'h'", "'labels'", "duplicate label name 'a'"]),
        ({"labels": []}, ["'h'", "'labels'"]),
        ({"labels": ["a", ""]}, ["'h'", "'labels'"]),
        ({"kind": "binary"}, ["'h'", "'labels'", "exactly 2"]),
        ({"kind": "binary", "labels": ["n", "p"], "thresholds": 1.0}, ["'h'", "'thresholds'", "1.0"]),
        ({"kind": "binary", "labels": ["n", "p"], "thresholds": 0.0}, ["'thresholds'", "0.0"]),
        ({"kind": "multilabel", "thresholds": [0.5, 1.5, 0.5]}, ["'thresholds'", "1.5"]),
        ({"kind": "multilabel", "thresholds": [0.5, 0.5]}, ["'thresholds'", "one threshold per label"]),
        ({"kind": "distribution", "cumulative_threshold": 1.2}, ["'cumulative_threshold'", "1.2"]),
        ({"cumulative_threshold": 0.9}, ["'cumulative_threshold'", "multiclass"]),
        ({"kind": "grouped"}, ["'groups'"]),
        ({"kind": "grouped", "groups": ["eco", "eco"]}, ["'groups'", "duplicate group name 'eco'"]),
        ({"kind": "grouped", "groups": ["bad name"]}, ["'groups'", "'bad name'"]),
        ({"groups": ["g"]}, ["'groups'", "only grouped heads"]),
        ({"class_weights": [1.0, -2.0, 1.0]}, ["'class_weights'", "-2.0"]),
        ({"class_weights": [1.0]}, ["'class_weights'", "3 positive numbers"]),
        ({"kind": "multilabel", "class_weights": [1.0, 1.0, 1.0]}, ["'class_weights'", "pos_weight"]),
        ({"pos_weight": 2.0}, ["'pos_weight'"]),
        ({"hidden_sizes": [0]}, ["'hidden_sizes'"]),
        ({"activation": "swish2"}, ["'activation'", "'swish2'"]),
        ({"dropout": 1.0}, ["'dropout'"]),
        ({"inputs_from": ["h"]}, ["'inputs_from'", "its own output"]),
        ({"name": "1abc"}, ["'1abc'"]),
        ({"name": "my-head"}, ["'my-head'"]),
    ],
)
def test_invalid_spec_names_head_field_and_value(overrides, expected):
    with pytest.raises(HeadSpecError) as err:
        make(**overrides)
    for fragment in expected:
        assert fragment in str(err.value)


def test_unknown_and_missing_fields_are_named():
    with pytest.raises(HeadSpecError, match=r"'h'.*unknown field\(s\) \['treshold'\]"):
        make(treshold=0.5)
    with pytest.raises(HeadSpecError, match=r"missing required field\(s\) \['labels'\]"):
        HeadSpec.from_dict({"name": "h", "kind": "binary"})


def test_head_list_checks_duplicates_and_fusion_order():
    a, b = make(name="a"), make(name="b", inputs_from=["a"])
    assert validate_heads([a, b]) == [a, b]
    with pytest.raises(HeadSpecError, match="duplicate head name 'a'"):
        validate_heads([a, make(name="a")])
    with pytest.raises(HeadSpecError, match="'b'.*'inputs_from'.*'c' is not a head"):
        validate_heads([a, make(name="b", inputs_from=["c"])])
    with pytest.raises(HeadSpecError, match="'b'.*'a' is a later head"):
        validate_heads([make(name="b", inputs_from=["a"]), a])
    with pytest.raises(HeadSpecError, match="duplicate head name"):
        MultiTaskConfig(encoder=tiny_encoder_config(), heads=[a.to_dict(), a.to_dict()])


def test_sizes_and_dict_round_trip():
    specs = [HeadSpec.from_dict(h) for h in ALL_KIND_HEADS]
    assert [s.num_logits for s in specs] == [1, 3, 3, 8, 3]
    for s in specs:
        assert HeadSpec.from_dict(s.to_dict()) == s
    assert specs[2].label_thresholds() == [0.3, 0.5, 0.7]
    assert make(kind="multilabel", thresholds=0.4).label_thresholds() == [0.4] * 3


def test_resolve_balanced_weights():
    spec = make(class_weights="balanced").resolve_balanced([10, 30, 0], total=40)
    # n / (k * count), like scikit-learn's compute_class_weight("balanced"); unseen labels get 1.
    assert spec.class_weights == pytest.approx([40 / 30, 40 / 90, 1.0])
    binary = make(kind="binary", labels=["n", "p"], pos_weight="balanced").resolve_balanced([90, 10], total=100)
    assert binary.pos_weight == pytest.approx(9.0)
    ml = make(kind="multilabel", pos_weight="balanced").resolve_balanced([10, 50, 0], total=100)
    assert ml.pos_weight == pytest.approx([9.0, 1.0, 1.0])
    # The square-root variant tempers the weights of rare labels.
    sq = make(kind="multilabel", pos_weight="sqrt_balanced").resolve_balanced([1, 50, 0], total=501)
    assert sq.pos_weight == pytest.approx([500 ** 0.5, (451 / 50) ** 0.5, 1.0])
    sqc = make(class_weights="sqrt_balanced").resolve_balanced([10, 30, 0], total=40)
    assert sqc.class_weights == pytest.approx([(40 / 30) ** 0.5, (40 / 90) ** 0.5, 1.0])
    assert make(kind="binary", labels=["n", "p"], pos_weight="sqrt_balanced").resolve_balanced([90, 10], total=100).pos_weight == pytest.approx(3.0)
