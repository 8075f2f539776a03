"""cluster.yaml is a valid Ray cluster launcher config for a GPU cluster that scales from zero."""

from pathlib import Path

import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]


def test_cluster_yaml_passes_rays_own_schema_and_plans_gpu_workers():
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(prepare_config(config))  # what `ray up` does: fill defaults, then check the schema
    head = config["available_node_types"][config["head_node_type"]]
    workers = [t for name, t in config["available_node_types"].items() if name != config["head_node_type"]]
    assert "GPU" not in head["resources"]
    assert workers and all(w["resources"].get("GPU", 0) >= 1 and w["min_workers"] == 0 for w in workers)
    assert config["docker"]["image"].startswith(f"rayproject/ray:{ray.__version__}-")
    assert any("pip install" in c and "/home/ray/mtcls" in c for c in config["setup_commands"])
