"""Temperature scaling on trained models: test-set ECE and macro-F1 before and after, printed as JSON.

    python -m benchmarks.calibration_quality                       # OLID and GoEmotions models below
    python -m benchmarks.calibration_quality --dataset olid --model /work/models/olid-fp32

For each model (trained with ``jobs/configs/train/<dataset>.yaml`` before calibration existed, so
without temperatures) this does what the training job now does after its best epoch's validation,
with the training job's own functions: the validation split comes from
:func:`pipelines.train.data.prepare_data` under the same config (OLID: the stable 10% hold-out of
the training file; GoEmotions: dev.parquet), and :func:`pipelines.train.validation.validate` with
``calibrate=True`` fits each calibratable head's calibration (:func:`mtcls.calibration.fit_calibration`:
``log(pos_weight)`` offset for sigmoid heads, temperature, kept only if it lowers the NLL of held-out
validation folds) and, for the heads training tunes (multilabel), tunes the thresholds and maps them
to the calibrated scores. The heads are written into a copy of the model as
``pipelines/train/run.py`` exports them. Both models are then evaluated on the test split by the
evaluation job (``precision``, default fp32), which reports per head the ECE of the output scores
and, for the calibrated model, the ECE without the temperature too (it must equal the original
model's ECE: a check printed as ``ece_before_check``).

Targets: ECE lower on every single-choice head, never higher on any head; macro-F1 moves
by at most 0.2 points.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import ROOT, TEST_SETS, Timer, machine, parser, print_json, start_ray, train_config

MODELS = {"olid": "/work/models/olid-fp32", "goemotions": "/work/models/goemotions-fp32"}
TEST = {name: str(path) for name, (path, _) in TEST_SETS.items()}
MAX_F1_MOVE_POINTS = 0.2


class PreparedRows:
    """The prepared validation pieces (Arrow tables), read the way :func:`validate` reads a Ray Data shard."""

    def __init__(self, tables: list) -> None:
        import pyarrow as pa

        self.table = pa.concat_tables(tables)

    def iter_batches(self, batch_size: int, batch_format: str = "numpy"):
        for start in range(0, self.table.num_rows, batch_size):
            part = self.table.slice(start, batch_size)
            yield {c: part.column(c).to_numpy(zero_copy_only=False) for c in part.column_names}


def calibrate_like_training(dataset: str, model_dir: str, target: Path) -> dict[str, Any]:
    """Fits temperatures (and re-tunes thresholds) on the training config's validation split; saves the result to ``target``."""
    import torch
    from transformers import AutoTokenizer

    from mtcls import MultiTaskModel, text_separator
    from pipelines.train.data import prepare_data
    from pipelines.train.validation import validate

    cfg = train_config(dataset)
    model = MultiTaskModel.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # The separator rule the training job's driver uses (one text column in both configs: never used).
    data = prepare_data(cfg, tokenizer, text_separator(model.config, tokenizer))
    specs = list(model.specs.values())
    for spec in data.specs:  # the labels are encoded in the model's label order
        assert spec.labels == model.specs[spec.name].labels and spec.groups == model.specs[spec.name].groups, spec.name
    assert all(s.temperature is None for s in specs), "the benchmark expects a model trained without calibration"

    with Timer() as timer:
        result = validate(model, PreparedRows(data.validation.parts), specs, cfg.batch_size * 2, tokenizer.pad_token_id or 0,
                          torch.device("cpu"), rank=0, world=1, tune_bins=cfg.threshold_bins if cfg.tune_thresholds else 0,
                          calibrate=True)
    # As pipelines/train/run.py exports the best epoch: each head as validation exported it.
    out: dict[str, Any] = {"validation_rows": data.validation.rows, "validation_seconds": timer.seconds, "heads": {}}
    for name, rep in result.reports.items():
        before = model.specs[name].thresholds
        model.set_head_spec(result.heads[name])
        out["heads"][name] = {"validation_calibration": rep.get("calibration", {}), "thresholds_before": before,
                              "thresholds_after": model.specs[name].thresholds}
    model.save_pretrained(target)
    for f in Path(model_dir).iterdir():
        if f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "vocab.txt"):
            shutil.copy(f, target / f.name)
    return out


def evaluate(model_dir: str, test: str, text_columns: list[str], output: Path, precision: str, plots: bool) -> dict[str, Any]:
    """The evaluation job's report of ``model_dir`` on ``test`` (thresholds as the model has them)."""
    from pipelines.evaluate import EvalConfig, run_evaluate

    return run_evaluate(EvalConfig(data=test, model=model_dir, output=str(output), text_columns=text_columns, precision=precision,
                                   tune_thresholds=False, plots=plots, progress=False))


def run_dataset(dataset: str, model_dir: str, work: Path, precision: str) -> dict[str, Any]:
    """Calibrates ``model_dir`` as training does, evaluates both models on the test split; per head before and after."""
    from mtcls import MultiTaskConfig

    cfg = train_config(dataset)
    calibrated = work / f"{dataset}-calibrated"
    fit = calibrate_like_training(dataset, model_dir, calibrated)
    before = evaluate(model_dir, TEST[dataset], cfg.text_columns, work / f"{dataset}-report-before", precision, plots=False)
    after = evaluate(str(calibrated), TEST[dataset], cfg.text_columns, work / f"{dataset}-report-after", precision, plots=True)
    specs = {s.name: s for s in MultiTaskConfig.from_pretrained(calibrated).head_specs()}
    heads = {}
    for name, spec in specs.items():
        cb, ca = before["calibration"].get(name, {}), after["calibration"].get(name, {})
        f1b, f1a = before["heads"][name]["macro_f1"], after["heads"][name]["macro_f1"]
        heads[name] = {
            "kind": spec.kind,
            # Decided by arg-max (no thresholds to tune): the heads whose top-label ECE the target names.
            "single_choice": not spec.impl.tunable,
            "temperature": spec.temperature,
            "logit_offset": spec.logit_offset,
            "validation": {k: v for k, v in fit["heads"][name]["validation_calibration"].items() if k != "temperature"},
            "thresholds_retuned": fit["heads"][name]["thresholds_after"] != fit["heads"][name]["thresholds_before"],
            "test_ece_before": cb.get("ece"),
            "test_ece_after": ca.get("ece"),
            "ece_before_check": ca.get("ece_without_temperature"),
            "test_macro_f1_before": f1b,
            "test_macro_f1_after": f1a,
            "macro_f1_change_points": (f1a - f1b) * 100,
        }
    # Every head with an ECE counts, calibrated or left as it was by the held-out check.
    calibrated_heads = [h for h in heads.values() if h["test_ece_before"] is not None]
    return {
        "model": model_dir,
        "test": TEST[dataset],
        "test_rows": after["rows"],
        "validation_rows": fit["validation_rows"],
        "validation_seconds": fit["validation_seconds"],
        "reports": {"before": str(work / f"{dataset}-report-before"), "after": str(work / f"{dataset}-report-after")},
        "heads": heads,
        "targets": {
            "ece_lower_on_every_single_choice_head": all(h["test_ece_after"] < h["test_ece_before"] for h in calibrated_heads if h["single_choice"]),
            "ece_never_higher": all(h["test_ece_after"] <= h["test_ece_before"] for h in calibrated_heads),
            f"macro_f1_moves_at_most_{MAX_F1_MOVE_POINTS}_points": all(abs(h["macro_f1_change_points"]) <= MAX_F1_MOVE_POINTS for h in heads.values()),
        },
    }


def per_label_check(dataset: str, model_dir: str) -> dict[str, Any]:
    """Does a temperature per label beat one per head? Fitted on the validation split, ECE on test.

    Raw logits come from the model's forward pass at fp32 (validation rows prepared as training
    prepares them; test texts tokenized by the same engine). For every binary and multilabel head,
    after the ``log(pos_weight)`` offset: test ECE with one temperature for the head and with one
    temperature per label (each fitted on that label's validation entries alone).
    """
    import pyarrow.parquet as pq
    import torch

    from mtcls import InferenceEngine, encode_labels
    from mtcls.calibration import expected_calibration_error, fit_temperature, scaled_logits
    from mtcls.inference import token_budget_batches
    from mtcls.modeling import head_probabilities

    cfg = train_config(dataset)
    engine = InferenceEngine.load(model_dir, precision="fp32", device="cpu")

    def logits(path: str) -> tuple[dict[str, torch.Tensor], Any]:
        table = pq.read_table(path)
        texts = [t if t is not None else "" for t in table.column(cfg.text_columns[0]).to_pylist()]
        tokens = engine.tokenize(texts)
        out = {n: torch.empty((len(texts), s.num_logits)) for n, s in engine.specs.items()}
        with torch.inference_mode():
            for idx in token_budget_batches(tokens.lengths, engine.max_tokens):
                ids, mask = tokens.padded(idx, engine.pad_id)
                result = engine.model(input_ids=ids, attention_mask=mask)
                for n in out:
                    out[n][torch.as_tensor(idx)] = result.logits[n].float().reshape(len(idx), -1)
        return out, table

    if not cfg.validation:
        return {"skipped": "the config holds out part of train.parquet; this check needs a validation file"}
    (zv, tv), (zt, tt) = logits(cfg.validation[0]), logits(TEST[dataset])
    heads = {}
    for name, spec in engine.specs.items():
        if not spec.impl.offsettable or spec.num_logits < 2:  # one logit: per label is per head
            continue
        offset = spec.impl.prior_offset(spec)
        yv = encode_labels(spec, tv.column(name).to_pylist(), on_unknown="mark").reshape(len(zv[name]), -1)
        yt = encode_labels(spec, tt.column(name).to_pylist(), on_unknown="mark").reshape(len(zt[name]), -1)
        shared = fit_temperature(spec, zv[name], yv, offset=offset)
        per_label = [fit_temperature(dataclasses.replace(spec, labels=[spec.labels[j]], pos_weight=None, thresholds=None),
                                     zv[name][:, j:j + 1], yv[:, j:j + 1], offset=None if offset is None else [offset[j]]) or 1.0
                     for j in range(spec.num_logits)]
        shifted = scaled_logits(zt[name], None, offset)
        heads[name] = {
            "test_ece_head_temperature": expected_calibration_error(spec, head_probabilities(spec, shifted / shared), yt),
            "test_ece_label_temperatures": expected_calibration_error(spec, head_probabilities(spec, shifted / torch.tensor(per_label)), yt),
            "head_temperature": shared,
            "label_temperatures_range": [min(per_label), max(per_label)],
        }
    return heads


def main() -> None:
    cli = parser(__doc__)
    cli.add_argument("--dataset", choices=sorted(MODELS), action="append", help="default: both")
    cli.add_argument("--model", help="model directory (with one --dataset); default: " + ", ".join(f"{k}: {v}" for k, v in MODELS.items()))
    cli.add_argument("--precision", default="fp32")
    cli.add_argument("--output", help="where the calibrated models and the reports go (default: a new temporary directory)")
    cli.add_argument("--per-label", action="store_true", help="only compare one temperature per head with one per label "
                        "(binary and multilabel heads; fitted on validation, test ECE)")
    args = cli.parse_args()
    datasets = args.dataset or sorted(MODELS)
    if args.model and len(datasets) != 1:
        cli.error("--model needs exactly one --dataset")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.chdir(ROOT)
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    work = Path(args.output or tempfile.mkdtemp(prefix="mtcls-calibration-"))
    work.mkdir(parents=True, exist_ok=True)
    ray = start_ray()
    results: dict[str, Any] = {}
    start = time.time()
    for dataset in datasets:
        model = args.model or MODELS[dataset]
        if not Path(TEST[dataset]).is_file() or not Path(model).is_dir():
            results[dataset] = {"skipped": f"{TEST[dataset]} or {model} not found"}
            continue
        results[dataset] = per_label_check(dataset, model) if args.per_label else run_dataset(dataset, model, work, args.precision)
    ray.shutdown()
    print_json({
        "machine": machine("cpus", "processor", "torch", "ray"),
        "precision": args.precision,
        "seconds": time.time() - start,
        "output": str(work),
        "datasets": results,
    })


if __name__ == "__main__":
    main()
