"""Shared fixtures: tiny random encoders built from a config, the packaged tokenizer, head sets."""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
from transformers import AutoTokenizer, BertConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import mtcls  # noqa: E402
from mtcls import MultiTaskModel  # noqa: E402

ALL_KIND_HEADS = [
    {"name": "trust", "kind": "binary", "labels": ["ok", "bad"], "pos_weight": 3.0},
    {"name": "type", "kind": "multiclass", "labels": ["news", "opinion", "ad"], "inputs_from": ["trust"]},
    {"name": "tags", "kind": "multilabel", "labels": ["x", "y", "z"], "thresholds": [0.3, 0.5, 0.7]},
    {"name": "topic", "kind": "grouped", "groups": ["economy", "race"], "labels": ["unknown", "neg", "neu", "pos"]},
    {"name": "sphere", "kind": "distribution", "labels": ["cs", "math", "bio"], "hidden_sizes": [8], "cumulative_threshold": 0.8},
]


def tiny_encoder_config(vocab_size: int = 30522) -> BertConfig:
    """A 2-layer, 32-wide BERT: builds in milliseconds, never downloads."""
    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=160,
    )


def tiny_model(heads=None, seed: int = 0, **kwargs) -> MultiTaskModel:
    torch.manual_seed(seed)
    config = mtcls.MultiTaskConfig(encoder=tiny_encoder_config(), heads=heads or ALL_KIND_HEADS, **kwargs)
    return MultiTaskModel(config).eval()


@pytest.fixture(scope="session")
def tokenizer():
    """The packaged all-MiniLM-L6-v2 tokenizer (a fast WordPiece tokenizer, on local disk)."""
    return AutoTokenizer.from_pretrained(str(mtcls.default_encoder_path()))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A saved tiny model with every head kind, plus the tokenizer: what jobs load."""
    path = tmp_path_factory.mktemp("tiny_model")
    tiny_model().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


#: Actors Ray Data keeps for the whole session (one each); any other actor alive after a module is a leftover.
_SESSION_ACTORS = {"_StatsActor", "_AutoscalingCoordinatorActor", "ActorLocationTracker"}


@pytest.fixture(scope="module", autouse=True)
def _fresh_ray_after_leftovers():
    """Shuts the session's Ray down after a module that left state behind: a placement group not
    removed or an actor still alive (a training run's), or CPUs still held. Such leftovers made the
    next module's scoring jobs wait forever on 2 CPUs. A module that leaves nothing keeps the Ray
    for the next one (a restart costs 5-15 s on 2 cores)."""
    yield
    import sys

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized() and _leftovers(ray):
        ray.shutdown()


def _leftovers(ray) -> bool:
    if any(pg["state"] != "REMOVED" for pg in ray.util.placement_group_table().values()):
        return True
    from ray._private import state

    alive = [a for a in state.actors().values() if a.get("State") != "DEAD" and a.get("ActorClassName") not in _SESSION_ACTORS]
    return bool(alive) or not _all_cpus_free(ray, wait_s=5.0)


@pytest.fixture(scope="session")
def _ray_session():
    """Shuts down the session's local Ray at the end (see :func:`ray_local`)."""
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()


def local_ray():
    """A local Ray with 2 CPUs (as on the CI machine), shared by the session: started on first use,
    restarted when an earlier test left CPUs held (a training run's actors or placement groups),
    since a scoring job would wait for them forever on 2 CPUs.

    For module-scoped fixtures, which cannot ask for the function-scoped :func:`ray_local`.
    """
    import ray

    if ray.is_initialized() and not _all_cpus_free(ray, wait_s=5.0):
        ray.shutdown()
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    return ray


@pytest.fixture()
def ray_local(_ray_session):
    """:func:`local_ray` for one test.

    A module that needs another Ray (GPUs declared, several nodes, S3 credentials in the workers'
    environment) shuts this one down and starts its own; the next test that asks for ``ray_local``
    starts it again.
    """
    yield local_ray()


def _all_cpus_free(ray, wait_s: float) -> bool:
    import time

    deadline = time.time() + wait_s
    while True:
        if ray.available_resources().get("CPU", 0) >= ray.cluster_resources().get("CPU", 0):
            return True
        if time.time() > deadline:
            return False
        time.sleep(0.25)


@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory, tokenizer):
    """A saved tiny random BERT encoder with the packaged tokenizer: what `encoder=` points at."""
    from transformers import AutoModel

    path = tmp_path_factory.mktemp("tiny_encoder")
    torch.manual_seed(0)
    AutoModel.from_config(tiny_encoder_config()).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@contextlib.contextmanager
def moto_s3(secret: str = "mtcls-test-secret", own_process: bool = False):
    """moto's S3 server on loopback with credentials in the environment (restored afterwards).

    Yields the endpoint URL. Ray workers started inside the block inherit the credentials.

    Args:
        secret: The secret access key put in the environment.
        own_process: Run the server in a process of its own, not a thread of this one: needed when
            this process calls a library that holds the GIL while it waits for the server
            (deltalake's ``is_deltatable``).
    """
    import socket
    import subprocess
    import sys
    import time

    import s3fs
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    if own_process:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("moto's server did not start")
            time.sleep(0.1)

        class _Stop:
            def stop(self) -> None:
                proc.terminate()
                proc.wait(timeout=30)

        server = _Stop()
    else:
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
        server.start()
    env = {"AWS_ACCESS_KEY_ID": "mtcls-test-key", "AWS_SECRET_ACCESS_KEY": secret, "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    s3fs.S3FileSystem.clear_instance_cache()  # no cached client pointing at another test's server
    try:
        yield env["AWS_ENDPOINT_URL"]
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
