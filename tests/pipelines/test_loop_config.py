"""The training loop's typed config: built from the job's config, carried through Ray Train's dict."""

import pickle

from mtcls import HeadSpec
from pipelines.config import load_config
from pipelines.train.config import TrainConfig
from pipelines.train.loop_config import LoopConfig

HEADS = [HeadSpec.from_dict({"name": "h", "kind": "multilabel", "labels": ["a", "b"]})]
PREPARED = dict(heads=HEADS, init_files=["ref"], train_rows=100, pad_token_id=0, torch_threads=1)


def job_config(*overrides):
    return load_config(TrainConfig, None, ["train=[x.parquet]", "heads=[{name: h, kind: multilabel}]", *overrides])


def test_the_defaults_are_the_training_jobs():
    assert LoopConfig.from_train_config(job_config(), **PREPARED) == LoopConfig(**{**PREPARED, "heads": tuple(HEADS)})


def test_every_job_key_is_carried():
    cfg = job_config("epochs=5", "batch_size=8", "tune_thresholds=false", "calibrate=false", "freeze_encoder=true",
                     "precision=fp32", "seed=7")
    loop = LoopConfig.from_train_config(cfg, **PREPARED)
    assert (loop.epochs, loop.batch_size, loop.precision, loop.seed) == (5, 8, "fp32", 7)
    assert loop.cached_features and loop.freeze_encoder and not loop.calibrate
    assert loop.tuning_bins == 0 and loop.validation_batch_size == 16
    assert loop.steps_per_epoch(world=2) == 7 and loop.batches_per_epoch(world=1) == 13


def test_it_travels_in_ray_trains_dict():
    loop = LoopConfig.from_train_config(job_config(), **PREPARED)
    config = pickle.loads(pickle.dumps(loop.as_train_loop_config()))
    assert LoopConfig.from_train_loop_config(config) == loop
    assert type(loop).__dataclass_params__.frozen  # nothing changes it on a worker
