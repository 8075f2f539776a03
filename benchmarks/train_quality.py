"""Fine-tuning quality on real data and training throughput, printed as JSON.

    python -m benchmarks.train_quality --dataset olid        [key=value overrides for the train config]
    python -m benchmarks.train_quality --dataset goemotions

Trains the packaged all-MiniLM-L6-v2 with ``jobs/configs/train/<dataset>.yaml`` through the real
training job (Ray Train, one CPU worker here), evaluates the exported model on the dataset's test
split through the evaluation job, and compares per-head macro-F1 with the targets and the published
references in ../shared/data/README.md. In the same run, a plain transformers ``Trainer`` fine-tunes
one single-head model on the same rows for ``--baseline-steps`` steps, for training throughput.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from benchmarks.harness import ROOT, TEST_SETS, Timer, machine, parser, print_json, skip, start_ray, train_config

TARGETS = {
    "olid": {"subtask_a": 0.75, "subtask_b": 0.60, "subtask_c": 0.50},
    "goemotions": {"emotions": 0.40},
}
PUBLISHED = {
    "olid": {"subtask_a": 0.829, "subtask_b": 0.755, "subtask_c": 0.660, "source": "best OffensEval 2019 systems"},
    "goemotions": {"emotions": 0.46, "source": "BERT-base, GoEmotions paper"},
}


def baseline_throughput(cfg, steps: int, group_by_length: bool = False) -> float:
    """examples/s of transformers' Trainer fine-tuning one single-head MiniLM on the first head.

    ``group_by_length`` turns on the Trainer's own length-grouped sampler (off by default there).
    """
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments

    import mtcls
    from mtcls.kinds.multilabel import Multilabel

    head = cfg.heads[0]
    encoder = str(mtcls.default_encoder_path())
    tok = AutoTokenizer.from_pretrained(encoder)
    table = pq.read_table(ROOT / cfg.train[0], columns=[*cfg.text_columns, head.get("column") or head["name"]])
    texts = table.column(cfg.text_columns[0]).to_pylist()
    raw = table.column(head.get("column") or head["name"]).to_pylist()
    multilabel = isinstance(mtcls.get_kind(head["kind"]), Multilabel)  # the Trainer needs its problem type
    labels = sorted({l for v in raw if v for l in (v if multilabel else [v])})
    rows = []
    for text, value in zip(texts, raw):
        if not text or value is None:
            continue
        enc = tok(text, truncation=True, max_length=cfg.max_length)
        if multilabel:
            enc["labels"] = [float(l in value) for l in labels]
        else:
            enc["labels"] = labels.index(value)
        rows.append(enc)
        if len(rows) >= steps * cfg.batch_size:
            break
    model = AutoModelForSequenceClassification.from_pretrained(
        encoder, num_labels=len(labels), problem_type="multi_label_classification" if multilabel else None
    )
    from transformers import DataCollatorWithPadding

    args = TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=cfg.batch_size, num_train_epochs=1,
                             learning_rate=cfg.learning_rate, report_to=[], save_strategy="no", logging_strategy="no",
                             use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0,
                             train_sampling_strategy="group_by_length" if group_by_length else "random")
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=DataCollatorWithPadding(tok))
    with Timer() as timer:
        trainer.train()
    return len(rows) / timer.seconds


def main() -> None:
    cli = parser(__doc__)
    cli.add_argument("--dataset", choices=sorted(TARGETS), required=True)
    cli.add_argument("--baseline-steps", type=int, default=100)
    cli.add_argument("overrides", nargs="*", help="train config overrides, key=value")
    args = cli.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.chdir(ROOT)
    test = TEST_SETS[args.dataset][0]
    if not test.is_file():
        skip(f"{test} not found (needs ../shared/data)")
        return

    import torch

    from pipelines.evaluate import EvalConfig, run_evaluate
    from pipelines.train import run_train

    work = Path(tempfile.mkdtemp(prefix=f"mtcls-{args.dataset}-"))
    cfg = train_config(args.dataset, [f"output={work / 'model'}", f"storage_path={work / 'ray_train'}", *args.overrides])
    ray = start_ray()
    with Timer() as training:
        summary = run_train(cfg)
    train_minutes = training.seconds / 60
    report = run_evaluate(EvalConfig(data=str(test), model=str(work / "model"), output=str(work / "report"),
                                     text_columns=cfg.text_columns, plots=False, progress=False))
    ray.shutdown()
    torch.set_num_threads(os.cpu_count() or 1)
    baseline = baseline_throughput(cfg, args.baseline_steps)
    baseline_grouped = baseline_throughput(cfg, args.baseline_steps, group_by_length=True)
    test_f1 = {h: r["macro_f1"] for h, r in report["heads"].items()}
    print_json({
        "dataset": args.dataset,
        "machine": machine("cpus", "processor", "torch", "ray"),
        "config": {k: v for k, v in cfg.model_dump().items() if k not in ("output", "storage_path")},
        "train_minutes": train_minutes,
        "best_epoch": summary["best_epoch"],
        "epochs": summary["epochs"],
        "tuned_thresholds": {h: t["thresholds"] for h, t in summary["tuned_thresholds"].items()},
        "validation_best": summary["best_metrics"],
        "test_macro_f1": test_f1,
        "targets": TARGETS[args.dataset],
        "targets_met": {h: test_f1.get(h, 0) >= t for h, t in TARGETS[args.dataset].items()},
        "published": PUBLISHED[args.dataset],
        "train_examples_per_s": summary["train_examples_per_s"],
        "hf_trainer_single_head_examples_per_s": baseline,
        "throughput_ratio_vs_single_head_trainer": summary["train_examples_per_s"] / baseline,
        "hf_trainer_single_head_group_by_length_examples_per_s": baseline_grouped,
        "throughput_ratio_vs_single_head_trainer_group_by_length": summary["train_examples_per_s"] / baseline_grouped,
    })


if __name__ == "__main__":
    main()
