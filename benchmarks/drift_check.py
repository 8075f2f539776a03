"""Drift on real data, and what profiles cost the scoring job; one run, printed as JSON.

    python -m benchmarks.drift_check --model outputs/model-olid [--only drift,overhead]

drift     An OLID model trained with jobs/configs/train/olid.yaml (it carries reference_profile.json)
          scores three partitions with the scoring job; the manifest's PSI per head is reported:
            quiet          a random half of the OLID test set (should not be flagged);
            only_off       the OLID test rows labelled subtask_a=OFF (should be flagged on subtask_a);
            goemotions     GoEmotions test comments, another data set (should be flagged).
overhead  The scoring job's steady-state rows/s with profile=true against profile=false, interleaved,
          with a near-zero-cost encoder (1 layer, hidden 32; the worst case: everything but the model
          is host work) and the OLID model; steady state is a 10x run minus a 1x run. Also the
          in-process cost of profiling one output file against the time the job spends per row.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import mtcls
from benchmarks.harness import (
    DATA, GOEMOTIONS, TEST_SETS, Timer, bench_job, machine, parser, print_json, repeat_to, save_model, skip, start_ray,
    steady, tiny_model, write_corpus
)
from mtcls.profile import load_reference, summarize
from pipelines.score import ScoreConfig, run_score


def score_partition(model: Path, table: pa.Table, work: Path, name: str) -> dict:
    """Scores ``table`` (``id``, ``tweet``) with the scoring job at fp32; its rows, flagged heads, PSI and prediction mix."""
    (work / name).mkdir(parents=True)
    pq.write_table(table, work / name / "part.parquet")
    cfg = ScoreConfig(input=str(work / name), output=str(work / f"{name}_out"), model=str(model), text_columns=["tweet"],
                      progress=False, precision="fp32")
    manifest = run_score(cfg)
    drift = manifest["drift"]
    return {"rows": manifest["rows_out"], "flagged": drift["flagged"],
            "psi": {h: d["psi"] for h, d in drift["heads"].items()},
            "worst_part": {h: d["worst_part"] for h, d in drift["heads"].items() if d["worst_part"]},
            "prediction_mix": {h: p["prediction_mix"] for h, p in manifest["profile"]["heads"].items()}}


def bench_drift(model: Path, work: Path) -> dict:
    """The three partitions scored with ``model``, against its reference profile."""
    reference = load_reference(model)
    if reference is None:
        return {"skipped": f"{model} has no reference_profile.json (train it with this version of jobs.train)"}
    olid = pq.read_table(TEST_SETS["olid"][0], columns=["id", "tweet", "subtask_a"])
    rng = np.random.default_rng(0)
    half = olid.take(np.sort(rng.choice(olid.num_rows, olid.num_rows // 2, replace=False)))
    off = olid.filter(pa.compute.equal(olid.column("subtask_a"), "OFF"))
    ge = pq.read_table(TEST_SETS["goemotions"][0], columns=["id", "text"]).rename_columns(["id", "tweet"])
    specs = {s.name: s for s in mtcls.MultiTaskConfig.from_pretrained(model).head_specs()}
    ref_mix = {h: summarize(specs[h], p)["prediction_mix"] for h, p in reference["heads"].items()}
    return {
        "reference": {"source": reference["source"], "rows": {h: p["rows"] for h, p in reference["heads"].items()}, "mix": ref_mix},
        "quiet_random_half_of_olid_test": score_partition(model, half.select(["id", "tweet"]), work, "half"),
        "only_off_rows_of_olid_test": score_partition(model, off.select(["id", "tweet"]), work, "off"),
        "goemotions_test_into_olid_model": score_partition(model, ge, work, "goemotions"),
    }


def bench_overhead(model: Path | None, work: Path, rows: int, repeats: int) -> dict:
    """Steady-state rows/s with the profile on and off (interleaved), and the in-process cost of one file's profile."""
    from transformers import AutoTokenizer

    from pipelines.sink.write import file_profile

    tokenizer = AutoTokenizer.from_pretrained(str(mtcls.default_encoder_path()))
    texts = pq.read_table(GOEMOTIONS / "train.parquet", columns=["text"]).column("text").to_pylist()
    out: dict = {}

    def corpus(n: int, name: str) -> Path:
        if not (work / name).exists():
            write_corpus(repeat_to(texts, n), work / name)
        return work / name

    models = {"near_zero_cost_encoder": (save_model(tiny_model(tokenizer), tokenizer, work / "tiny"), rows * 5)}
    if model is not None:
        models["olid_minilm"] = (model, rows)
    for name, (model_dir, n) in models.items():
        rates: dict[str, list[float]] = {"on": [], "off": []}
        small, large = corpus(n, f"{name}_1x"), corpus(n * 10, f"{name}_10x")
        for r in range(repeats):
            for setting in (("on", "off") if r % 2 == 0 else ("off", "on")):
                kw = dict(profile=setting == "on", block_rows=4096)
                a = bench_job(small, model_dir, work / "o", **kw)
                b = bench_job(large, model_dir, work / "o", **kw)
                rates[setting].append(steady(a, b))
        on, off = float(np.median(rates["on"])), float(np.median(rates["off"]))
        out[name] = {"rows_1x": n, "steady_rows_per_s_profile_on": rates["on"], "steady_rows_per_s_profile_off": rates["off"],
                     "ratio_of_medians_on_over_off": on / off}

    # The profile itself, in process: one 100,000-row output table with the OLID-like heads of the tiny model.
    spec_model = tiny_model(tokenizer)
    specs = list(spec_model.specs.values())
    n = 100_000
    probs = {s.name: np.random.default_rng(0).dirichlet(np.ones(s.num_labels), n).astype(np.float32) for s in specs}
    columns = {}
    for s in specs:
        columns.update(s.impl.decode(s, probs[s.name]))
    table = pa.table({"id": pa.array(np.arange(n).astype(str)), **columns, "truncated": pa.array(np.zeros(n, bool)),
                      "error": pa.nulls(n, pa.string())})
    with Timer() as timer:
        file_profile(table, specs)
    out["profile_of_one_100k_row_file"] = {"seconds": timer.seconds, "microseconds_per_row": 1e6 * timer.seconds / n,
                                           "heads": [s.kind for s in specs]}
    return out


def main() -> None:
    cli = parser(__doc__)
    cli.add_argument("--model", default="", help="an OLID model trained with jobs/configs/train/olid.yaml")
    cli.add_argument("--only", default="drift,overhead")
    cli.add_argument("--rows", type=int, default=3000, help="rows of the 1x OLID-model run (x5 for the tiny encoder)")
    cli.add_argument("--repeats", type=int, default=2)
    args = cli.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if not DATA.is_dir():
        skip(f"{DATA} not found")
        return
    start_ray()
    work = Path(tempfile.mkdtemp(prefix="mtcls-drift-"))
    model = Path(args.model) if args.model else None
    results: dict = {"machine": machine("cpus")}
    if "drift" in args.only and model is not None:
        results["drift"] = bench_drift(model, work)
    if "overhead" in args.only:
        results["overhead"] = bench_overhead(model, work, args.rows, args.repeats)
    print_json(results)


if __name__ == "__main__":
    main()
