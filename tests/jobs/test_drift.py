"""jobs.drift: the manifests of date partitions -> one table and one plot per head, flagged days marked."""

import json

import numpy as np
import pandas as pd
import pytest

from jobs.drift import main
from mtcls import HeadSpec
from mtcls.profile import head_profile
from pipelines.score.drift import drift_section, profile_section
from pipelines.sink.base import Verification
from pipelines.storage import InputError
from tests.conftest import ALL_KIND_HEADS
from tests.mtcls.test_profile import random_probs

SPECS = [HeadSpec.from_dict(h) for h in ALL_KIND_HEADS[:4]]  # binary, multiclass, multilabel, grouped


def write_partition(root, day, probs, reference):
    """A complete partition as the scoring job leaves it: its manifest (profile and drift sections) and ``_SUCCESS``."""
    prof = {s.name: head_profile(s, probs[s.name]) for s in SPECS}
    rows = len(probs[SPECS[0].name])
    verification = Verification(rows_out=rows, rows_error=3, profile=prof)
    manifest = {"status": "complete", "model": {"weights_sha256": "abc"}, "profile": profile_section(SPECS, verification),
                "drift": drift_section(SPECS, verification, reference, 0.2, "model")}
    (root / f"date={day}").mkdir(parents=True)
    (root / f"date={day}" / "_manifest.json").write_text(json.dumps(manifest))
    (root / f"date={day}" / "_SUCCESS").write_text("")
    return manifest


def test_drift_table_and_plots_over_partitions(tmp_path, capsys):
    rng = np.random.default_rng(0)
    reference = {"heads": {s.name: head_profile(s, random_probs(s, 3000, rng)) for s in SPECS}, "source": "test"}
    root = tmp_path / "scores"
    days = ["2026-11-20", "2026-11-21", "2026-11-22"]
    for day in days:
        probs = {s.name: random_probs(s, 500, rng) for s in SPECS}
        if day == "2026-11-21":  # a bad feed: every row looks like class "ad"
            probs["type"][:] = [0.01, 0.01, 0.98]
        write_partition(root, day, probs, reference)
    (root / "date=2026-11-19").mkdir()
    (root / "date=2026-11-19" / "_manifest.json").write_text(json.dumps({"rows_in": 5}))  # scored with profile=false
    (root / "date=2026-11-19" / "_SUCCESS").write_text("")

    summary = main([str(root)])
    assert summary["partitions"] == ["2026-11-19", *days] and summary["partitions_without_profile"] == ["2026-11-19"]
    assert summary["flagged"] == [{"partition": "2026-11-21", "head": "type"}]
    table = pd.read_csv(root / "_drift" / "drift.csv", keep_default_na=False)
    ad = table[(table["head"] == "type") & (table["label"] == "ad")].set_index("partition")
    assert list(ad.index) == days and ad.loc["2026-11-21", "share"] == 1.0 and ad.loc["2026-11-20", "share"] < 0.6
    assert bool(ad.loc["2026-11-21", "flagged"]) and ad.loc["2026-11-21", "psi"] > 0.2 > ad.loc["2026-11-20", "psi"]
    # Shares of a single-choice head sum to 1 per partition; grouped heads per group; multilabel rows name the label.
    sums = table[table["head"] == "type"].groupby("partition")["share"].sum()
    assert np.allclose(sums, 1.0, atol=1e-5)
    topic = table[table["head"] == "topic"].groupby(["partition", "part"])["share"].sum()
    assert set(topic.index.get_level_values("part")) == {"economy", "race"} and np.allclose(topic, 1.0, atol=1e-5)
    assert set(table[table["head"] == "tags"]["label"]) == {"x", "y", "z"}
    assert np.allclose(table["error_rate"], 3 / 500)
    for s in SPECS:
        assert (root / "_drift" / f"{s.name}_drift.png").stat().st_size > 5000
    assert json.loads(capsys.readouterr().out)["table"].endswith("drift.csv")


def test_a_root_without_partition_manifests_fails_naming_it(tmp_path):
    (tmp_path / "date=2026-11-20").mkdir()
    with pytest.raises(InputError, match=f"scores root '{tmp_path}' has no partition manifests"):
        main([f"root={tmp_path}"])
    with pytest.raises(InputError, match="does not exist"):
        main([f"root={tmp_path}/absent"])


def test_delta_partition_outputs_are_read_and_an_incomplete_one_refused(tmp_path, tiny_model_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from deltalake import DeltaTable

    from pipelines.score import ScoreConfig, run_score

    root = tmp_path / "scores"
    for k, day in enumerate(["2026-12-01", "2026-12-02"]):
        pq.write_table(pa.table({"id": [f"{day}-{i}" for i in range(20 + k)], "text": [f"review {i}" for i in range(20 + k)]}),
                       tmp_path / f"{day}.parquet")
        run_score(ScoreConfig(input=str(tmp_path / f"{day}.parquet"), output=str(root / f"date={day}"), model=str(tiny_model_dir),
                              output_format="delta", progress=False, precision="fp32"), inline=True)
    summary = main([str(root)])
    assert summary["partitions"] == ["2026-12-01", "2026-12-02"] and summary["incomplete_partitions"] == []
    table = pd.read_csv(root / "_drift" / "drift.csv", keep_default_na=False)
    assert set(table["partition"]) == {"2026-12-01", "2026-12-02"} and set(table["head"]) >= {"trust", "type"}

    DeltaTable(str(root / "date=2026-12-02")).alter.set_table_properties({"mtcls.status": "incomplete"}, raise_if_not_exists=False)
    with pytest.raises(InputError, match='date=2026-12-02.*mtcls.status is "incomplete"'):
        main([str(root)])
