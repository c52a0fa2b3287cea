"""The Kubernetes manifests (infra/k8s, applied with `kubectl apply -k`), validated offline against the vendored
schemas: Kubernetes 1.33's strict JSON schemas (from the kubernetes-validate package; unknown fields refused) and
KubeRay's RayCluster ray.io/v1 (infra/k8s/schemas/kuberay). A planted error in any of them fails."""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

import jsonschema
import pytest
import yaml
from referencing import Registry, Resource

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "infra" / "k8s"
SCHEMAS = K8S / "schemas"
KUBERNETES = SCHEMAS / "kubernetes" / "v1.33.0-local-strict"
RAYCLUSTER_SCHEMA = SCHEMAS / "kuberay" / "raycluster-ray-v1.json"
# The Secrets the manifests read, which an operator creates (infra/k8s/README.md says how); never in the repo.
SECRETS = {"aeforge-db", "mlflow-db", "aeforge-s3", "aeforge-tokens", "ray-auth"}


def _registry() -> Registry:
    resources = []
    for path in [*KUBERNETES.glob("*.json"), RAYCLUSTER_SCHEMA]:
        contents = json.loads(path.read_text(encoding="utf-8"))
        resources.append((contents["$id"], Resource.from_contents(contents)))
    return Registry().with_resources(resources)


REGISTRY = _registry()


def schema_for(doc: dict) -> dict:
    """The vendored schema of a manifest's apiVersion and kind; an unknown one is an error."""
    api_version, kind = doc.get("apiVersion", ""), doc.get("kind", "")
    if (api_version, kind) == ("ray.io/v1", "RayCluster"):
        return json.loads(RAYCLUSTER_SCHEMA.read_text(encoding="utf-8"))
    group, _, version = api_version.rpartition("/")
    group = group.split(".")[0]
    name = f"{kind.lower()}-{group + '-' if group else ''}{version}.json"
    path = KUBERNETES / name
    assert path.exists(), f"no vendored schema for {api_version} {kind} ({name})"
    return json.loads(path.read_text(encoding="utf-8"))


def errors_of(doc: dict) -> list[str]:
    validator = jsonschema.Draft202012Validator(schema_for(doc), registry=REGISTRY)
    return [
        f"{'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
        for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    ]


@functools.cache
def manifests() -> tuple[tuple[str, dict], ...]:
    """Every resource kustomization.yaml applies: (file, document). Read once; callers copy before editing."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text(encoding="utf-8"))
    found = []
    for name in kustomization["resources"]:
        for doc in yaml.safe_load_all((K8S / name).read_text(encoding="utf-8")):
            if doc:
                found.append((name, doc))
    return tuple(found)


def by_kind(kind: str) -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for _, doc in manifests() if doc["kind"] == kind}


def pod_specs() -> list[tuple[str, dict]]:
    specs = [(f"Deployment/{name}", d["spec"]["template"]["spec"]) for name, d in by_kind("Deployment").items()]
    for name, ray in by_kind("RayCluster").items():
        specs.append((f"RayCluster/{name} head", ray["spec"]["headGroupSpec"]["template"]["spec"]))
        specs += [
            (f"RayCluster/{name} {g['groupName']}", g["template"]["spec"]) for g in ray["spec"]["workerGroupSpecs"]
        ]
    return specs


def test_kustomization_applies_every_manifest_in_the_folder():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text(encoding="utf-8"))
    assert set(kustomization) <= {"apiVersion", "kind", "namespace", "labels", "resources", "images"}, kustomization
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == on_disk
    assert kustomization["namespace"] == "aeforge"


@pytest.mark.parametrize(
    "name,doc", manifests(), ids=lambda v: v if isinstance(v, str) else f"{v['kind']}/{v['metadata']['name']}"
)
def test_manifest_is_valid_against_its_schema(name, doc):
    assert errors_of(doc) == []


def _first_container(doc: dict) -> dict:
    spec = doc["spec"]
    template = spec["template"] if "template" in spec else spec["headGroupSpec"]["template"]
    return template["spec"]["containers"][0]


def _plant(kind: str, edit) -> dict:
    doc = copy.deepcopy(next(d for _, d in manifests() if d["kind"] == kind))
    edit(doc)
    return doc


PLANTED = {
    "a misspelled container field": ("Deployment", lambda d: _first_container(d).update(imagePullPolcy="Always")),
    "a string for replicas": ("Deployment", lambda d: d["spec"].update(replicas="one")),
    "a probe without a handler field": (
        "Deployment",
        lambda d: _first_container(d)["readinessProbe"].update(httpGet={"path": "/healthz", "prot": 8765}),
    ),
    "an unknown RayCluster field": ("RayCluster", lambda d: d["spec"]["workerGroupSpecs"][0].update(maxReplica=8)),
    "a negative maxReplicas": ("RayCluster", lambda d: d["spec"]["workerGroupSpecs"][0].update(maxReplicas=-1)),
    "an unknown field in a Ray pod template": ("RayCluster", lambda d: _first_container(d).update(envfrom=[])),
    "an unknown upscaling mode": ("RayCluster", lambda d: d["spec"]["autoscalerOptions"].update(upscalingMode="Fast")),
    "a Service port as a list": ("Service", lambda d: d["spec"]["ports"][0].update(port=[8765])),
    "a ConfigMap value that is not a string": ("ConfigMap", lambda d: d["data"].update(AEFORGE_MAX_ATTEMPTS=3)),
}


@pytest.mark.parametrize("what", list(PLANTED))
def test_a_planted_error_fails_validation(what):
    kind, edit = PLANTED[what]
    assert errors_of(_plant(kind, edit)) != [], f"{what} passed validation"


def test_an_unknown_kind_has_no_schema():
    with pytest.raises(AssertionError, match="no vendored schema"):
        schema_for({"apiVersion": "apps/v1", "kind": "DaemonSett"})


def test_the_raycluster_has_a_cpu_head_and_an_autoscaled_gpu_group():
    ray = by_kind("RayCluster")["aeforge"]["spec"]
    assert ray["enableInTreeAutoscaling"] is True
    assert ray["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    head = ray["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"].get("limits", {})
    gpu = next(g for g in ray["workerGroupSpecs"] if g["groupName"] == "gpu")
    assert gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"] and gpu["maxReplicas"] >= 1
    worker = gpu["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert worker["image"].endswith("-cuda") and head["image"].endswith("-cpu")
    assert ray["rayVersion"] == "2.60.0"


def test_the_service_and_mlflow_are_probed_and_mlflow_lists_its_hosts():
    deployments = by_kind("Deployment")
    services = by_kind("Service")
    # MLflow is ready when its tracking API answers (its backend store with it), alive while /health does.
    mlflow_api = "/api/2.0/mlflow/experiments/search?max_results=1"
    expected = {
        "aeforge": {"startupProbe": "/healthz", "readinessProbe": "/healthz", "livenessProbe": "/healthz"},
        "mlflow": {"startupProbe": "/health", "readinessProbe": mlflow_api, "livenessProbe": "/health"},
    }
    for name, paths in expected.items():
        container = deployments[name]["spec"]["template"]["spec"]["containers"][0]
        for probe, path in paths.items():
            assert container[probe]["httpGet"]["path"] == path, (name, probe)
        selector = services[name]["spec"]["selector"]
        labels = deployments[name]["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items(), f"Service {name} selects no pod of its Deployment"
    assert deployments["aeforge"]["spec"]["strategy"]["type"] == "Recreate"  # one dispatcher at a time
    command = deployments["mlflow"]["spec"]["template"]["spec"]["containers"][0]["command"]
    hosts = next(a for a in command if a.startswith("--allowed-hosts=")).split("=", 1)[1].split(",")
    assert {"mlflow", "mlflow:5000", "mlflow.aeforge.svc:5000", "localhost"} <= set(hosts)
    ray_address = by_kind("ConfigMap")["aeforge-service"]["data"]["RAY_ADDRESS"]
    assert ray_address.startswith("http://aeforge-head-svc.")  # the Service KubeRay makes for the head


def test_pods_run_unprivileged_with_pinned_images_and_known_settings():
    config_maps = set(by_kind("ConfigMap"))
    for where, spec in pod_specs():
        security = spec["securityContext"]
        assert security["runAsNonRoot"] is True and security["runAsUser"] != 0, where
        for container in spec["containers"]:
            image = container["image"]
            assert ":" in image and not image.endswith(":latest"), (where, image)
            assert container["securityContext"]["allowPrivilegeEscalation"] is False, where
            for source in container.get("envFrom", []):
                assert source["configMapRef"]["name"] in config_maps, (where, source)
            for var in container.get("env", []):
                ref = var.get("valueFrom", {}).get("secretKeyRef")
                assert ref is None or ref["name"] in SECRETS, (where, var)
        for volume in spec.get("volumes", []):
            if "secret" in volume:
                assert volume["secret"]["secretName"] in SECRETS, (where, volume)
    readme = (K8S / "README.md").read_text(encoding="utf-8")
    assert all(name in readme for name in SECRETS), "infra/k8s/README.md must say how to create each Secret"
