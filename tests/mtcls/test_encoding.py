import numpy as np
import pytest

from mtcls import HeadSpec, LabelError, decode_labels, encode_labels, join_texts
from tests.conftest import ALL_KIND_HEADS

SPECS = {h["name"]: HeadSpec.from_dict(h) for h in ALL_KIND_HEADS}


def test_join_texts_joins_present_fields_and_reports_bad_rows():
    columns = {
        "title": ["A title", None, "  ", 42, "T", b"\xff\xfe", None],
        "abstract": ["An abstract", "Only abstract", "", "x", float("nan"), "y", "   "],
    }
    texts, errors = join_texts(columns, " [SEP] ")
    assert texts[:2] == ["A title [SEP] An abstract", "Only abstract"]
    assert texts[4] == "T"
    assert errors[2] == "empty text: columns ['title', 'abstract'] are all null, empty or whitespace"
    assert errors[3] == "column 'title': expected a string, got int"
    assert errors[5].startswith("column 'title': invalid UTF-8")
    assert texts[6] is None and "empty text" in errors[6]
    assert [t is None for t in texts] == [e is not None for e in errors]
    single, errs = join_texts({"text": ["ok\x00ok", ""]}, " ")
    assert single[0] == "ok ok" and errs[1] == "empty text: column 'text' is null, empty or whitespace"


def test_encode_each_kind_and_round_trip():
    cases = {
        "trust": ["bad", None, "ok"],
        "type": ["ad", "news", float("nan")],
        "tags": [["x", "z"], [], None],
        "topic": [{"economy": "pos", "race": None}, [("race", "neg")], None],
        "sphere": [[0.2, 0.3, 0.5], {"bio": 1.0}, None],
    }
    expected = {
        "trust": [1, -100, 0],
        "type": [2, 0, -100],
        "tags": [[1, 0, 1], [0, 0, 0], [-100] * 3],
        "topic": [[3, -100], [-100, 1], [-100, -100]],
        "sphere": [[0.2, 0.3, 0.5], [0, 0, 1], [-100] * 3],
    }
    for name, values in cases.items():
        encoded = encode_labels(SPECS[name], values)
        np.testing.assert_allclose(encoded, expected[name], rtol=1e-6, err_msg=name)
    assert decode_labels(SPECS["type"], encode_labels(SPECS["type"], cases["type"])) == ["ad", "news", None]
    assert decode_labels(SPECS["tags"], encode_labels(SPECS["tags"], cases["tags"])) == [["x", "z"], [], None]
    assert decode_labels(SPECS["topic"], encode_labels(SPECS["topic"], cases["topic"]))[1] == {"economy": None, "race": "neg"}


@pytest.mark.parametrize(
    "name, values, message",
    [
        ("type", ["news", "sports"], "head 'type': row 1: label 'sports' is not one of"),
        ("tags", [["x"], ["q"]], "head 'tags': row 1: label 'q'"),
        ("tags", ["x"], "head 'tags': row 0: expected a list of label names"),
        ("topic", [{"sport": "pos"}], "head 'topic': row 0: unknown group 'sport'"),
        ("topic", [{"race": "great"}], "head 'topic': row 0: label 'great'"),
        ("sphere", [[0.5, 0.6, 0.0]], "head 'sphere': row 0: soft labels must be non-negative and sum to 1"),
        ("sphere", [[0.5, 0.5]], "head 'sphere': row 0: expected 3 probabilities"),
    ],
)
def test_bad_labels_name_head_row_and_value(name, values, message):
    with pytest.raises(LabelError) as err:
        encode_labels(SPECS[name], values)
    assert message in str(err.value)


def test_mark_mode_encodes_unknown_labels_as_invalid():
    assert encode_labels(SPECS["type"], ["news", "sports"], on_unknown="mark").tolist() == [0, -1]
    assert encode_labels(SPECS["tags"], [["q"]], on_unknown="mark").tolist() == [[-1, -1, -1]]
