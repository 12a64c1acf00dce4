"""The image, the k8s/ manifests and the operator's defaults name one version: etlrouter:<package version>;
the operator's workloads match the image (uid 10001, read-only root, a volume for its data directory)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import yaml

from etlrouter import __version__
from etlrouter.core.config import OperatorConfig
from etlrouter.operator.cluster import DEFAULT_IMAGE, desired_objects, parse_spec
from etlrouter.operator.inject import SidecarSpec, sidecar_container
from tests.conftest import ROOT

IMAGE = f"etlrouter:{__version__}"


def test_the_package_version_is_the_one_version() -> None:
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"] == __version__
    assert re.search(rf"^ARG VERSION={re.escape(__version__)}$", (ROOT / "Dockerfile").read_text(), re.M)
    assert DEFAULT_IMAGE == IMAGE
    assert OperatorConfig().sidecar_image == IMAGE
    assert parse_spec({"spec": {}}).image == IMAGE


def _images(node: Any) -> list[str]:
    found: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "image" and isinstance(value, str):
                found.append(value)
            elif key == "image" and isinstance(value, dict) and "default" in value:
                found.append(str(value["default"]))
            else:
                found += _images(value)
    elif isinstance(node, list):
        for item in node:
            found += _images(item)
    return found


def test_every_manifest_names_the_versioned_image() -> None:
    images: dict[str, list[str]] = {}
    for path in sorted(Path(ROOT / "k8s").rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            images[str(path.relative_to(ROOT))] = images.get(str(path.relative_to(ROOT)), []) + _images(doc)
    named = {path: found for path, found in images.items() if found}
    assert "k8s/operator/deployment.yaml" in named and "k8s/samples/cluster.yaml" in named
    assert "k8s/crds/etlrouterclusters.yaml" in named
    for path, found in named.items():
        assert set(found) == {IMAGE}, (path, found)


def _security(container: dict[str, Any]) -> None:
    sc = container["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 10001 and sc["readOnlyRootFilesystem"] is True
    assert any(m["mountPath"] == "/var/lib/etlrouter" for m in container["volumeMounts"]), container


def test_operator_workloads_match_the_image() -> None:
    cr = {
        "apiVersion": "etlrouter.io/v1alpha1",
        "kind": "EtlRouterCluster",
        "metadata": {"name": "main", "namespace": "ns", "uid": "u"},
        "spec": {},
    }
    objects = desired_objects(cr, bootstrap_peers="", statefulset_replicas=3, pdb_api_version="policy/v1")
    sts = next(o for o in objects if o["kind"] == "StatefulSet")
    pod = sts["spec"]["template"]["spec"]
    assert pod["securityContext"]["fsGroup"] == 10001
    (router,) = pod["containers"]
    assert router["image"] == IMAGE
    _security(router)
    assert router["resources"]["requests"] and router["readinessProbe"] and router["livenessProbe"]
    sidecar = sidecar_container(SidecarSpec(image=IMAGE, routers=("r:7400",), scan_ports="50051"))
    _security(sidecar)
    operator = next(
        doc
        for doc in yaml.safe_load_all((ROOT / "k8s/operator/deployment.yaml").read_text())
        if doc["kind"] == "Deployment"
    )
    spec = operator["spec"]["template"]["spec"]
    assert spec["securityContext"]["runAsUser"] == 10001
    container = spec["containers"][0]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert any(m["mountPath"] == "/var/lib/etlrouter" for m in container["volumeMounts"])
