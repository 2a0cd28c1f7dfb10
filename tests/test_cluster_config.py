"""cluster.yaml passes Ray's own launcher schema checks; deploy/rayjob.yaml is a well-formed RayJob."""

from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent


def test_cluster_yaml_validates_with_ray():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load((REPO / "cluster.yaml").read_text()))
    validate_config(config)
    types = config["available_node_types"]
    assert types["head"]["resources"] == {"CPU": 0}
    assert "g5" in types["gpu_worker"]["node_config"]["InstanceType"]
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start  # the dashboard is not opened to the world
    ports = {p["FromPort"] for p in config["provider"]["security_group"]["IpPermissions"]}
    assert ports == {22}
    assert any("pip install" in c and "-e ." in c for c in config["setup_commands"])


def test_cluster_yaml_schema_rejects_a_misspelled_field():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    config["max_worker"] = config.pop("max_workers")
    with pytest.raises(Exception, match="max_worker"):
        validate_config(prepare_config(config))


def test_rayjob_manifest():
    job = yaml.safe_load((REPO / "deploy" / "rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert job["spec"]["entrypoint"].startswith("python -m jobs.train --config configs/cifar10.yaml")
    assert (REPO / "configs" / "cifar10.yaml").exists()
    workers = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
