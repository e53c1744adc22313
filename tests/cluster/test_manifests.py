"""The Kubernetes manifests in deploy/: both overlays render with kustomize (kubectl's
built-in one) and every rendered object passes kubernetes-validate in strict mode; the
probes are native gRPC probes on the health port; every container has requests and
limits; hops sit behind headless Services and the router finds them by DNS."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
OVERLAYS = ["cpu", "gpu"]
HOPS = ["embedding", "search", "rerank", "generation"]
GRPC_PORT = 50051
K8S_VERSION = "1.32"


def render(overlay: str) -> list[dict]:
    """``kubectl kustomize deploy/overlays/<overlay>`` (or a standalone kustomize)."""
    if shutil.which("kubectl"):
        cmd = ["kubectl", "kustomize", str(DEPLOY / "overlays" / overlay)]
    elif shutil.which("kustomize"):
        cmd = ["kustomize", "build", str(DEPLOY / "overlays" / overlay)]
    else:
        pytest.fail("neither kubectl nor kustomize is installed (apt-get install kubectl)")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=60).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request) -> tuple[str, list[dict]]:
    """(overlay, its rendered objects)."""
    return request.param, render(request.param)


def by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def workloads(docs: list[dict]) -> dict[str, dict]:
    return by_kind(docs, "Deployment") | by_kind(docs, "StatefulSet")


def test_every_object_passes_strict_validation(rendered):
    _, docs = rendered
    assert len(docs) >= 20
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_strict_validation_catches_a_typo(rendered):
    _, docs = rendered
    broken = dict(by_kind(docs, "Service")["embedding"])
    broken["spec"] = dict(broken["spec"], clusterIp="None")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_probes_are_grpc_on_the_health_port_and_resources_are_bounded(rendered):
    overlay, docs = rendered
    for name, workload in workloads(docs).items():
        for container in workload["spec"]["template"]["spec"]["containers"]:
            for probe in ("readinessProbe", "livenessProbe"):
                assert container[probe]["grpc"]["port"] == GRPC_PORT, (name, probe)
                assert set(container[probe]) - {"grpc", "periodSeconds", "failureThreshold"} == set()
            resources = container["resources"]
            for side in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources[side]), (name, side)
            assert container["lifecycle"]["preStop"]["sleep"]["seconds"] > 0
            if name in HOPS:
                service = container["readinessProbe"]["grpc"]["service"]
                assert service.startswith("backbone.v1."), name
            gpu = resources["limits"].get("nvidia.com/gpu")
            assert (gpu == 1) == (overlay == "gpu" and name in ("embedding", "rerank", "generation"))


def test_hops_are_headless_and_the_router_finds_them_by_dns(rendered):
    _, docs = rendered
    services = by_kind(docs, "Service")
    for hop in HOPS:
        assert services[hop]["spec"]["clusterIP"] == "None"
        assert hop in by_kind(docs, "PodDisruptionBudget")
    assert services["router"]["spec"]["type"] == "ClusterIP"
    args = workloads(docs)["router"]["spec"]["template"]["spec"]["containers"][0]["args"]
    for hop in HOPS:
        assert f"{hop}=dns:///{hop}.backbone.svc.cluster.local:{GRPC_PORT}" in args
    search = by_kind(docs, "StatefulSet")["search"]
    assert search["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"


def test_stateless_hops_scale_on_their_queue(rendered):
    _, docs = rendered
    hpas = by_kind(docs, "HorizontalPodAutoscaler")
    for hop in ("embedding", "rerank", "generation"):
        metric = hpas[hop]["spec"]["metrics"][0]
        assert metric["type"] == "Pods"
        assert metric["pods"]["metric"]["name"] == "backbone_queue_depth"
        assert metric["pods"]["metric"]["selector"]["matchLabels"] == {"hop": hop}
        assert hpas[hop]["spec"]["scaleTargetRef"]["name"] == hop
    # FAISS on disk: a new replica would start empty, so search does not autoscale.
    assert "search" not in hpas


def test_the_config_map_is_a_valid_backbone_config(rendered, tmp_path):
    from server.config import load_config

    _, docs = rendered
    maps = [d for d in docs if d["kind"] == "ConfigMap"]
    assert len(maps) == 1
    path = tmp_path / "backbone.toml"
    path.write_text(maps[0]["data"]["backbone.toml"])
    config = load_config(path)
    assert config.server.host == "0.0.0.0" and config.server.port == GRPC_PORT
