"""Scale-out without a shared filesystem: a two-node Ray cluster (ray.cluster_utils, both nodes on this machine,
listening on 127.0.0.1 only) whose workers write to different store folders; every artifact ends in the driver's
store, and the results equal the local executor's."""
from __future__ import annotations

import pytest
import torch

from tda_core.attribution import attribute
from tda_core.evaluation import GROUND_TRUTH_KIND, SUBSET_TARGETS_KIND, ground_truth
from tda_core.ray_executor import RayExecutor, ray_module
from tda_core.specs import EnsembleSpec, EvalSpec, MethodSpec
from tda_core.store import Store
from tda_core.tasks import get_task

from test_ray import assert_same_up_to_batching  # noqa: E402

DIGITS = get_task("digits-mlp")
KRON = MethodSpec("trak", "kron", proj_dim=64)


@pytest.mark.slow
def test_without_a_shared_filesystem_every_artifact_ends_in_the_drivers_store(tmp_path):
    ensemble = EnsembleSpec("dropout", I=2, D=2)
    local_truth = ground_truth(DIGITS, EvalSpec(M=4), store=tmp_path / "local", device="cpu", chunk=2)
    local = attribute(DIGITS, KRON, ensemble, store=tmp_path / "local", device="cpu")

    ray = ray_module(localhost=True)
    from ray.cluster_utils import Cluster

    nodes = [tmp_path / "node0", tmp_path / "node1"]  # each node's workers write to their own TDA_STORE
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                            "env_vars": {"TDA_STORE": str(nodes[0])}})
    try:
        cluster.add_node(num_cpus=1, env_vars={"TDA_STORE": str(nodes[1])})
        ex = RayExecutor(address=cluster.address, workers=2, store="driver")
        driver = Store(tmp_path / "driver")
        truth = ground_truth(DIGITS, EvalSpec(M=4), store=driver, device="cpu", chunk=2, executor=ex)
        result = attribute(DIGITS, KRON, ensemble, store=driver, device="cpu", executor=ex)
        ex.close()
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert torch.allclose(truth.targets, local_truth.targets, rtol=0, atol=1e-6)
    assert_same_up_to_batching(result.scores, local.scores)
    written = [{(kind.name, p.stem) for kind in node.iterdir() for p in kind.glob("*.json")} if node.exists() else set()
               for node in nodes]
    assert all(written), "both nodes ran tasks"
    kinds = ("checkpoints", "features", "test_features", SUBSET_TARGETS_KIND)
    assert set.union(*written) == {(kind, key) for kind in kinds for key in driver.keys(kind)}
    assert [len(driver.keys(kind)) for kind in kinds] == [2, 4, 4, 4] and driver.has(GROUND_TRUTH_KIND, truth.key)
