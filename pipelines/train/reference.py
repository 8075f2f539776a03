"""The reference profile a trained model carries: its validation rows as the exported model scores them.

Computed in :func:`pipelines.train.validation.validate` with the head's final temperature and
thresholds, summed over the workers like the statistics, and written by the training job next to the
weights as ``reference_profile.json`` (:mod:`mtcls.profile`). Scoring compares each partition with it
(drift).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from mtcls import HeadSpec
from mtcls.calibration import calibrated_probabilities
from mtcls.profile import empty_head_profile, head_profile


def reference_profiles(specs: list[HeadSpec], local: dict[str, tuple[torch.Tensor, np.ndarray]], world: int) -> dict[str, dict[str, Any]]:
    """Per head, the profile of this worker's validation rows plus their true-label counts, summed over workers.

    Args:
        specs: The heads as exported (fitted temperature and tuned thresholds applied).
        local: Per head, this worker's validation logits and encoded labels.
        world: Number of workers (every worker must call this, in the same order).
    """
    out: dict[str, dict[str, Any]] = {}
    for spec in specs:
        if spec.name in local:
            z, y = local[spec.name]
            prof = head_profile(spec, calibrated_probabilities(spec, z).numpy())
            counts, labelled = spec.impl.label_counts(spec, np.asarray(y))
        else:
            prof, labelled = empty_head_profile(spec), 0
            counts = spec.impl.label_counts(spec, np.zeros((0, *spec.impl.logit_shape(spec)), dtype=np.int64))[0]
        out[spec.name] = {**prof, "label_counts": [float(c) for c in counts], "labelled_rows": int(labelled)}
    if world > 1:
        import torch.distributed as dist

        for head in out.values():
            for key in ("rows", "mix", "score_hist", "score_sum", "label_counts", "labelled_rows"):
                t = torch.as_tensor(np.asarray(head[key], dtype=np.float64))
                dist.all_reduce(t)
                value = t.numpy()
                head[key] = value.tolist() if value.ndim else float(value)
            head["rows"], head["labelled_rows"] = int(head["rows"]), int(head["labelled_rows"])
            head["mix"] = np.asarray(head["mix"]).astype(np.int64).tolist()
            head["score_hist"] = np.asarray(head["score_hist"]).astype(np.int64).tolist()
    return out
