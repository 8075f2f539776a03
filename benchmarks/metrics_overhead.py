"""What the scoring metrics cost the inference actor, per block, printed as JSON.

    python -m benchmarks.metrics_overhead [--model tiny|minilm] [--rows 4096] [--blocks 8] [--rounds 5]

Two ``InferenceActor`` instances in this process (Ray started, so ``ray.util.metrics`` and the
key-value store are live), one recording the per-block metrics (what scoring does) and one without
(``metrics=None``), each called on the same tokenized GoEmotions blocks of ``--rows`` rows, in
alternating rounds. Prints the median seconds per block of each and their ratio, and the median
time the recording itself took per block (timed inside the actor: what the ratio's noise hides). With the tiny
encoder (1 layer, hidden 32) the forward pass is nearly free, so the ratio bounds the metrics' share
from above; with MiniLM it is what a CPU job sees.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import GOEMOTIONS, corpus_texts, machine, minilm_model, parser, print_json, repeat_to, save_model, start_ray, tiny_model


def main() -> None:
    args = parser(__doc__)
    args.add_argument("--model", choices=["tiny", "minilm"], default="tiny")
    args.add_argument("--rows", type=int, default=4096)
    args.add_argument("--blocks", type=int, default=8)
    args.add_argument("--rounds", type=int, default=5)
    opts = args.parse_args()
    texts = corpus_texts(GOEMOTIONS / "train.parquet")
    if texts is None:
        return None
    import pyarrow as pa
    from transformers import AutoTokenizer

    import mtcls
    from pipelines.actor import InferenceActor, ScoredColumns
    from pipelines.artifacts import read_model_files
    from pipelines.blocks import PRECISION, PRECISION_TYPE
    from pipelines.metrics import new_stats_key, score_tags
    from pipelines.sink.schema import output_schema
    from pipelines.tokenize import tokenize_block

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    start_ray(num_cpus=os.cpu_count())
    tokenizer = AutoTokenizer.from_pretrained(str(mtcls.default_encoder_path()))
    model = minilm_model() if opts.model == "minilm" else tiny_model(tokenizer)
    with tempfile.TemporaryDirectory(prefix="mtcls-metrics-bench-") as tmp:
        model_dir = save_model(model, tokenizer, Path(tmp) / "model")
        rows = repeat_to(texts, opts.rows * opts.blocks)
        blocks = [tokenize_block(pa.table({"id": [str(i) for i in range(k, k + opts.rows)], "text": rows[k:k + opts.rows]}),
                                 ["id"], ["text"], " ", 128, tokenizer) for k in range(0, len(rows), opts.rows)]
        schema = output_schema(model.config.head_specs(), pa.schema([("id", pa.string())]), {}, ["text"])
        common: dict[str, Any] = dict(inputs="tokens", output=ScoredColumns(pa.schema([*schema, pa.field(PRECISION, PRECISION_TYPE)])),
                                      precision="fp32", max_length=128, torch_threads=os.cpu_count())
        files = [read_model_files(model_dir)]
        actors = {"with_metrics": InferenceActor(files, metrics=dict(tags=score_tags("score", "bench"), stats_key=new_stats_key()), **common),
                  "without": InferenceActor(files, **common)}
        for actor in actors.values():
            actor(blocks[0])  # warm-up: kernels, first metric registration
        recording: list[float] = []  # the with-metrics actor's own recording time, per block (noise-free)
        inner = actors["with_metrics"].metrics.record

        def timed_record(*a: Any, **kw: Any) -> None:
            start = time.perf_counter()
            inner(*a, **kw)
            recording.append(time.perf_counter() - start)

        actors["with_metrics"].metrics.record = timed_record
        seconds: dict[str, list[float]] = {name: [] for name in actors}
        for r in range(opts.rounds):
            for name in (list(actors) if r % 2 == 0 else list(actors)[::-1]):
                for block in blocks:
                    start = time.perf_counter()
                    actors[name](block)
                    seconds[name].append(time.perf_counter() - start)
    median = {name: statistics.median(values) for name, values in seconds.items()}
    print_json({"machine": machine(), "model": opts.model, "rows_per_block": opts.rows, "blocks": len(blocks) * opts.rounds,
                "median_s_per_block": {k: round(v, 4) for k, v in median.items()},
                "metrics_ms_per_block": round((median["with_metrics"] - median["without"]) * 1000, 2),
                "recording_ms_per_block_median": round(statistics.median(recording) * 1000, 3),
                "without_over_with": round(median["without"] / median["with_metrics"], 4)})


if __name__ == "__main__":
    main()
