"""Scoring on a two-node Ray cluster (ray.cluster_utils.Cluster): actors on both nodes, rows exactly once."""

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.score import ScoreConfig, run_score


@pytest.fixture()
def two_node_cluster():
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=2)
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    yield ray
    ray.shutdown()
    cluster.shutdown()


@pytest.mark.slow
def test_two_node_scoring(tmp_path, tiny_model_dir, two_node_cluster):
    ray = two_node_cluster
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    (tmp_path / "in").mkdir()
    for k in range(4):
        ids = [f"f{k}-{i}" for i in range(50)]
        pq.write_table(pa.table({"id": ids, "text": [f"text number {i} of file {k}" for i in range(50)]}), tmp_path / "in" / f"{k}.parquet")
    cfg = ScoreConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"), model=str(tiny_model_dir),
                      block_rows=25, max_tokens_per_batch=256, progress=False)
    manifest = run_score(cfg)
    assert manifest["resources"]["num_actors"] == 2  # 3 CPUs in the cluster, one kept for read/write
    out = pd.read_parquet(tmp_path / "out")
    assert len(out) == 200 and out["id"].is_unique and out["error"].isna().all()
