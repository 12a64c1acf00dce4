"""The sidecar injection patch: what it adds, that it is idempotent, and the errors that name annotations."""

from __future__ import annotations

from typing import Any

import pytest

from etlrouter.operator.inject import (
    DATA_VOLUME,
    INJECTED_ANNOTATION,
    ISSUER_AUDIENCE,
    SIDECAR_NAME,
    TOKEN_FILE,
    TOKEN_VOLUME,
    InjectionError,
    SidecarSpec,
    SidecarTls,
    apply_patch,
    has_sidecar,
    inject_sidecar,
    sidecar_container,
    sidecar_spec_from_annotations,
    wants_injection,
)

SPEC = SidecarSpec(image="etlrouter:test", routers=("r0:7400", "r1:7400"), scan_ports="50051-50053")


def pod(
    annotations: dict[str, str] | None = None, volumes: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    spec: dict[str, Any] = {"containers": [{"name": "app", "image": "svc:1"}]}
    if volumes is not None:
        spec["volumes"] = volumes
    meta: dict[str, Any] = {"name": "p"}
    if annotations is not None:
        meta["annotations"] = annotations
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec}


def test_patch_adds_sidecar_volume_and_annotation_keeping_the_app() -> None:
    original = pod({"etlrouter.io/inject": "true"})
    patched = apply_patch(original, inject_sidecar(original, SPEC))
    names = [c["name"] for c in patched["spec"]["containers"]]
    assert names == ["app", SIDECAR_NAME]
    sidecar = patched["spec"]["containers"][1]
    assert sidecar == sidecar_container(SPEC)
    assert sidecar["image"] == "etlrouter:test"
    args = sidecar["args"]
    assert args[0] == "sidecar"
    assert args[args.index("--scan-ports") + 1] == "50051-50053"
    assert [args[i + 1] for i, a in enumerate(args) if a == "--router"] == ["r0:7400", "r1:7400"]
    assert patched["spec"]["volumes"] == [{"name": DATA_VOLUME, "emptyDir": {}}]
    assert patched["metadata"]["annotations"] == {"etlrouter.io/inject": "true", INJECTED_ANNOTATION: "true"}
    assert original["spec"]["containers"] == [{"name": "app", "image": "svc:1"}], "input must not change"


def test_annotation_key_is_escaped_as_a_json_pointer() -> None:
    patch = inject_sidecar(pod({"a": "b"}), SPEC)
    assert {"op": "add", "path": "/metadata/annotations/etlrouter.io~1injected", "value": "true"} in patch


def test_pod_without_annotations_or_with_volumes() -> None:
    bare = apply_patch(pod(None), inject_sidecar(pod(None), SPEC))
    assert bare["metadata"]["annotations"] == {INJECTED_ANNOTATION: "true"}
    with_volume = pod({}, volumes=[{"name": "data", "emptyDir": {}}])
    patched = apply_patch(with_volume, inject_sidecar(with_volume, SPEC))
    assert [v["name"] for v in patched["spec"]["volumes"]] == ["data", DATA_VOLUME]


def test_injection_is_idempotent() -> None:
    once = apply_patch(pod({}), inject_sidecar(pod({}), SPEC))
    assert has_sidecar(once)
    assert inject_sidecar(once, SPEC) == []


def test_wants_injection_only_for_true() -> None:
    assert wants_injection(pod({"etlrouter.io/inject": "true"}))
    assert wants_injection(pod({"etlrouter.io/inject": "True"}))
    assert not wants_injection(pod({"etlrouter.io/inject": "false"}))
    assert not wants_injection(pod(None))


def test_spec_from_annotations() -> None:
    spec = sidecar_spec_from_annotations(
        {"etlrouter.io/router": "a:7400, b:7400", "etlrouter.io/ports": "50051"}, image="img"
    )
    assert spec == SidecarSpec(image="img", routers=("a:7400", "b:7400"), scan_ports="50051")


@pytest.mark.parametrize(
    ("annotations", "needle"),
    [
        ({"etlrouter.io/ports": "50051"}, "annotation etlrouter.io/router is required"),
        (
            {"etlrouter.io/router": "nohost", "etlrouter.io/ports": "1"},
            "annotation etlrouter.io/router: invalid",
        ),
        ({"etlrouter.io/router": "a:1"}, "annotation etlrouter.io/ports is required"),
        (
            {"etlrouter.io/router": "a:1", "etlrouter.io/ports": "x-9"},
            "annotation etlrouter.io/ports: invalid",
        ),
        ({"etlrouter.io/router": "a:1", "etlrouter.io/ports": "0-70000"}, "must lie in 1..65535"),
    ],
)
def test_bad_annotations_name_the_annotation(annotations: dict[str, str], needle: str) -> None:
    with pytest.raises(InjectionError, match=needle.replace(".", r"\.")):
        sidecar_spec_from_annotations(annotations, image="img")


def test_apply_patch_refuses_other_operations() -> None:
    with pytest.raises(ValueError, match="only `add`"):
        apply_patch({}, [{"op": "remove", "path": "/a"}])


TLS = SidecarTls(
    issuer_url="https://etlrouter-webhook.etlrouter-system.svc/v1/sidecar-certificate",
    issuer_ca="-----BEGIN CERTIFICATE-----\nCA\n-----END CERTIFICATE-----\n",
    trust_domain="main.prod.etlrouter",
)


def test_a_tls_cluster_sidecar_gets_the_issuer_settings_and_a_bound_token() -> None:
    spec = SidecarSpec(
        image="etlrouter:test", routers=("main-client.prod.svc:7400",), scan_ports="50051", tls=TLS
    )
    original = pod({"etlrouter.io/inject": "true"}, volumes=[{"name": "mine", "emptyDir": {}}])
    patched = apply_patch(original, inject_sidecar(original, spec))
    sidecar = patched["spec"]["containers"][1]
    env = {e["name"]: e.get("value") for e in sidecar["env"]}
    assert env["ETLROUTER_TLS__ISSUER_URL"] == TLS.issuer_url
    assert env["ETLROUTER_TLS__ISSUER_CA"] == TLS.issuer_ca
    assert env["ETLROUTER_TLS__ISSUER_TOKEN_FILE"] == TOKEN_FILE
    assert env["ETLROUTER_TLS__TRUST_DOMAIN"] == "main.prod.etlrouter"
    assert {"name": TOKEN_VOLUME, "mountPath": "/var/run/secrets/etlrouter.io", "readOnly": True} in sidecar[
        "volumeMounts"
    ]
    assert [v["name"] for v in patched["spec"]["volumes"]] == ["mine", DATA_VOLUME, TOKEN_VOLUME]
    token = patched["spec"]["volumes"][2]["projected"]["sources"][0]["serviceAccountToken"]
    assert token == {"audience": ISSUER_AUDIENCE, "expirationSeconds": 3600, "path": "token"}
    assert sidecar["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"
    # Without TLS: none of it.
    plain = apply_patch(original, inject_sidecar(original, SPEC))
    assert not any(e["name"].startswith("ETLROUTER_TLS__") for e in plain["spec"]["containers"][1]["env"])
    assert [v["name"] for v in plain["spec"]["volumes"]] == ["mine", DATA_VOLUME]
    assert plain["spec"]["containers"][1]["readinessProbe"]["httpGet"]["scheme"] == "HTTP"
