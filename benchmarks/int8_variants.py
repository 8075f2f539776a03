"""Which int8 quantization keeps decisions closest to fp32? Variants of the route, printed as JSON.

    python -m benchmarks.int8_variants --olid-model M1 --goemotions-model M2 [--only v1,v2]

For each model (trained with ``jobs/configs/train/olid.yaml`` and ``goemotions.yaml``) and its
test set, the encoder is exported by :func:`mtcls.quantize.export_int8` once per variant:

- ``v1``: every MatMul and Attention node int8 (the first route);
- ``matmul_only``: attention left fp32;
- ``reduce_range``: v1 with 7-bit weights;
- ``v2``: v1 with each layer's feed-forward output projection fp32 (the route jobs use now).

Per variant and head: test macro-F1 against fp32 (points), the share of rows whose whole decision
(label, or label set) equals fp32's, and the forward speed against fp32 (texts/s of the same
``predict`` call, 2 threads).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

import mtcls
from benchmarks.harness import TEST_SETS, Timer, decisions, machine, parser, print_json
from mtcls.quantize import QUANTIZED_OPS, export_int8

VARIANTS = {
    "v1": dict(keep_fp32=lambda path: []),
    "matmul_only": dict(op_types=("MatMul",), keep_fp32=lambda path: []),
    "reduce_range": dict(keep_fp32=lambda path: [], reduce_range=True),
    "v2": dict(op_types=QUANTIZED_OPS),
}


def compare(model_dir: str, data: Path, column: str, variants: list[str], threads: int) -> dict:
    """fp32's test macro-F1 per head, then per variant: macro-F1 change, rows agreeing with fp32, speed against fp32."""
    table = pq.read_table(data)
    texts = [t or "" for t in table.column(column).to_pylist()]
    fp32 = mtcls.InferenceEngine.load(model_dir, torch_threads=threads, precision="fp32", device="cpu")
    with Timer() as fp32_time:
        reference, _ = fp32.predict(texts)
    labels = {n: mtcls.encode_labels(s, table.column(n).to_pylist(), on_unknown="mark") for n, s in fp32.specs.items()}
    f1 = {n: mtcls.head_report(s, mtcls.head_statistics(s, labels[n], reference[n]))["macro_f1"] for n, s in fp32.specs.items()}
    out: dict = {"rows": len(texts), "fp32_macro_f1": f1, "variants": {}}
    for name in variants:
        path = Path(tempfile.mkdtemp(prefix="mtcls-int8-")) / "encoder.int8.onnx"
        export_int8(fp32.model, path, **VARIANTS[name])
        engine = mtcls.InferenceEngine.load(model_dir, torch_threads=threads, precision="int8", device="cpu", int8_file=path)
        with Timer() as timer:
            probs, _ = engine.predict(texts)
        heads = {}
        for head, spec in fp32.specs.items():
            macro = mtcls.head_report(spec, mtcls.head_statistics(spec, labels[head], probs[head]))["macro_f1"]
            same = np.all(decisions(spec, probs[head]) == decisions(spec, reference[head]), axis=1)
            heads[head] = {"macro_f1_delta_points": 100 * (macro - f1[head]), "rows_agreeing": float(same.mean())}
        out["variants"][name] = {"forward_vs_fp32": fp32_time.seconds / timer.seconds, "heads": heads}
    return out


def main() -> None:
    cli = parser(__doc__)
    cli.add_argument("--olid-model", help="model trained with jobs/configs/train/olid.yaml")
    cli.add_argument("--goemotions-model", help="model trained with jobs/configs/train/goemotions.yaml")
    cli.add_argument("--only", default=",".join(VARIANTS), help="variants to compare")
    cli.add_argument("--threads", type=int, default=2)
    args = cli.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    variants = args.only.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        cli.error(f"unknown variants {unknown}; choose from {sorted(VARIANTS)}")
    results: dict = {"machine": machine("cpus", "torch")}
    for name, model in (("olid", args.olid_model), ("goemotions", args.goemotions_model)):
        path, column = TEST_SETS[name]
        if model and path.is_file():
            results[name] = compare(model, path, column, variants, args.threads)
    print_json(results)


if __name__ == "__main__":
    main()
