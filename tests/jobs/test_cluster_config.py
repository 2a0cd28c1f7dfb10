"""cluster.yaml passes Ray's own launcher schema checks; deploy/rayjob.yaml is a RayJob that KubeRay accepts and
that submits; every image the deploy files name is built from the Dockerfile (or is Ray's own, at the pinned
version); the Dockerfile's install line installs what CI tests."""

import re
import shlex
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
RAY_VERSION = "2.60.0"
# the image the Dockerfile builds, as the deploy files name it (ghcr.io/your-org: the registry the user replaces)
PROJECT_IMAGE = "ghcr.io/your-org/flowray:0.1.0"


def test_cluster_yaml_validates_with_ray():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load((REPO / "cluster.yaml").read_text()))
    validate_config(config)
    types = config["available_node_types"]
    assert types["head"]["resources"] == {"CPU": 0}
    assert "g5" in types["gpu_worker"]["node_config"]["InstanceType"]
    # the node type that `train.eval_resource=scoring` asks for, so that the autoscaler can start one
    assert types["scoring_worker"]["resources"] == {"scoring": 1} and types["scoring_worker"]["min_workers"] == 0
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start  # the dashboard is not opened to the world
    ports = {p["FromPort"] for p in config["provider"]["security_group"]["IpPermissions"]}
    assert ports == {22}
    assert config["docker"]["image"] == PROJECT_IMAGE  # the project is in the image: nothing to install at start


def test_cluster_yaml_schema_rejects_a_misspelled_field():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    config["max_worker"] = config.pop("max_workers")
    with pytest.raises(Exception, match="max_worker"):
        validate_config(prepare_config(config))


# The RayJob API of KubeRay v1.5.1 (ray-operator/apis/ray/v1/rayjob_types.go and raycluster_types.go, the first
# release with SidecarMode): the fields this project sets, with their JSON types, and the allowed submission modes.
KUBERAY = "v1.5.1"
RAYJOB_SPEC = {
    "entrypoint": str,
    "submissionMode": str,
    "shutdownAfterJobFinishes": bool,
    "ttlSecondsAfterFinished": int,
    "activeDeadlineSeconds": int,
    "backoffLimit": int,
    "runtimeEnvYAML": str,
    "rayClusterSpec": dict,
    "clusterSelector": dict,
    "submitterPodTemplate": dict,
    "submitterConfig": dict,
    "jobId": str,
    "metadata": dict,
    "suspend": bool,
    "entrypointNumCpus": (int, float),
    "entrypointNumGpus": (int, float),
    "entrypointResources": str,
    "deletionStrategy": dict,
    "managedBy": str,
}
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}
CLUSTER_SPEC = {
    "rayVersion": str,
    "headGroupSpec": dict,
    "workerGroupSpecs": list,
    "enableInTreeAutoscaling": bool,
    "autoscalerOptions": dict,
    "suspend": bool,
    "managedBy": str,
    "gcsFaultToleranceOptions": dict,
    "headServiceAnnotations": dict,
}
HEAD_GROUP = {
    "rayStartParams": dict,
    "template": dict,
    "serviceType": str,
    "headService": dict,
    "enableIngress": bool,
    "resources": dict,
    "labels": dict,
}
WORKER_GROUP = {
    "groupName": str,
    "replicas": int,
    "minReplicas": int,
    "maxReplicas": int,
    "rayStartParams": dict,
    "template": dict,
    "numOfHosts": int,
    "idleTimeoutSeconds": int,
    "suspend": bool,
    "scaleStrategy": dict,
    "resources": dict,
    "labels": dict,
}


def _check_fields(obj: dict, schema: dict, where: str) -> list[str]:
    errors = [f"{where}.{k}: not a field of KubeRay {KUBERAY}'s API" for k in obj if k not in schema]
    errors += [
        f"{where}.{k}: {type(v).__name__}, not {schema[k]}"
        for k, v in obj.items()
        if k in schema and (not isinstance(v, schema[k]) or (schema[k] is int and isinstance(v, bool)))
    ]
    return errors


def rayjob_errors(job: dict) -> list[str]:
    """What KubeRay's API (CRD schema and the operator's RayJob validation) would refuse, or what cannot submit."""
    errors = [] if (job.get("apiVersion"), job.get("kind")) == ("ray.io/v1", "RayJob") else ["not a ray.io/v1 RayJob"]
    spec = job.get("spec", {})
    errors += _check_fields(spec, RAYJOB_SPEC, "spec")
    cluster = spec.get("rayClusterSpec", {})
    errors += _check_fields(cluster, CLUSTER_SPEC, "spec.rayClusterSpec")
    head = cluster.get("headGroupSpec", {})
    groups = [("headGroupSpec", head, HEAD_GROUP)] + [
        (f"workerGroupSpecs[{i}]", g, WORKER_GROUP) for i, g in enumerate(cluster.get("workerGroupSpecs", []))
    ]
    for where, group, schema in groups:
        errors += _check_fields(group, schema, where)
        # map[string]string in the CRD: an unquoted 0 or true is refused by the API server
        errors += [
            f"{where}.rayStartParams.{k}: {v!r} is not a string"
            for k, v in group.get("rayStartParams", {}).items()
            if not isinstance(v, str)
        ]
    mode = spec.get("submissionMode", "K8sJobMode")  # the CRD's default
    if mode not in SUBMISSION_MODES:
        errors.append(f"spec.submissionMode: {mode!r} is not one of {sorted(SUBMISSION_MODES)}")
    loopback = head.get("rayStartParams", {}).get("dashboard-host", "0.0.0.0") in ("127.0.0.1", "localhost")
    if loopback and mode in ("K8sJobMode", "HTTPMode"):
        errors.append(
            f"spec.submissionMode {mode} submits from outside the head Pod, which cannot reach a dashboard "
            "bound to 127.0.0.1"
        )
    if mode == "SidecarMode":
        errors += [
            f"spec.{k}: not allowed in SidecarMode"
            for k in ("clusterSelector", "submitterPodTemplate", "submitterConfig")
            if k in spec
        ]
        if head.get("template", {}).get("spec", {}).get("restartPolicy") != "Never":
            errors.append("headGroupSpec.template.spec.restartPolicy: SidecarMode needs Never")
    return errors


def _rayjob() -> dict:
    return yaml.safe_load((REPO / "deploy" / "rayjob.yaml").read_text())


def test_rayjob_manifest_is_accepted_and_submits():
    job = _rayjob()
    assert rayjob_errors(job) == []
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == RAY_VERSION
    workers = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda j: j["spec"].pop("submissionMode"), "K8sJobMode submits from outside the head Pod"),
        (lambda j: j["spec"].update(submissionMode="Sidecar"), "'Sidecar' is not one of"),
        (
            lambda j: j["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"].pop("restartPolicy"),
            "restartPolicy: SidecarMode needs Never",
        ),
        (lambda j: j["spec"].update(submitterPodTemplate={}), "submitterPodTemplate: not allowed in SidecarMode"),
        (
            lambda j: j["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}),
            "num-cpus: 0 is not a string",
        ),
        (lambda j: j["spec"].update(ttlSecondsAfterFinish=600), "spec.ttlSecondsAfterFinish: not a field"),
        (lambda j: j["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].update(replicas="2"), "replicas: str, not"),
    ],
)
def test_rayjob_check_refuses_what_kuberay_refuses(edit, message):
    job = _rayjob()
    edit(job)
    assert any(message in e for e in rayjob_errors(job)), rayjob_errors(job)


def test_rayjob_entrypoint_parses_with_the_jobs_own_parser(tmp_path):
    from jobs.train import parser
    from pipelines.train.config import load_config

    argv = shlex.split(_rayjob()["spec"]["entrypoint"])
    assert argv[:2] == ["flowray", "train"]  # the image installs the project, and with it the console script
    args = parser().parse_args(argv[2:])
    cfg = load_config(REPO / args.config, args.overrides)  # every --set key and value is validated here
    assert cfg.train.storage_path == "/mnt/shared/ray_results" and cfg.data.shards == "/mnt/shared/data/cifar10"


def _deploy_images() -> dict[str, str]:
    cluster = yaml.safe_load((REPO / "cluster.yaml").read_text())
    images = {"cluster.yaml docker.image": cluster["docker"]["image"]}
    spec = _rayjob()["spec"]["rayClusterSpec"]
    groups = [("headGroupSpec", spec["headGroupSpec"])] + [
        (f"workerGroupSpecs[{i}]", g) for i, g in enumerate(spec["workerGroupSpecs"])
    ]
    for where, group in groups:
        for c in group["template"]["spec"]["containers"]:
            images[f"rayjob.yaml {where} {c['name']}"] = c["image"]
    return images


def test_every_deploy_image_is_the_dockerfile_or_rays_own():
    dockerfile = (REPO / "Dockerfile").read_text()
    base = re.search(r"^FROM\s+(\S+)", dockerfile, re.M).group(1)
    assert base == f"rayproject/ray:{RAY_VERSION}-py311-gpu"  # ray-ml stopped at 2.49: this tag exists
    assert f"docker build -t {PROJECT_IMAGE} ." in dockerfile  # the tag the deploy files pull
    for where, image in _deploy_images().items():
        assert image == PROJECT_IMAGE or image.startswith(f"rayproject/ray:{RAY_VERSION}"), (where, image)


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def test_dockerfile_installs_what_ci_tests():
    """A parse-level check (no docker here): the image's pip line uses constraints-gpu.txt, which pins every runtime
    dependency of pyproject.toml at the version of constraints.txt (the CPU lock that `make test` installs)."""
    import tomllib

    dockerfile = (REPO / "Dockerfile").read_text()
    assert "pip install --no-cache-dir -c constraints-gpu.txt -e ." in dockerfile
    for copied in re.findall(r"^COPY\s+(?:--\S+\s+)*(.+?)\s+\S+$", dockerfile, re.M):
        for path in copied.split():
            assert (REPO / path).exists(), f"Dockerfile copies {path}, which this checkout lacks"
    gpu, cpu = _pins(REPO / "constraints-gpu.txt"), _pins(REPO / "constraints.txt")
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in deps:
        name = re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.-]+", dep).group(0)).lower()
        assert name in gpu, f"constraints-gpu.txt does not pin {name}"
        assert gpu[name] == cpu[name], f"{name}: constraints-gpu.txt {gpu[name]}, constraints.txt {cpu[name]}"
    assert set(gpu) <= set(cpu), set(gpu) - set(cpu)
