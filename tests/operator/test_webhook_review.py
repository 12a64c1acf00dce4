"""AdmissionReview parsing and answers, and the webhook configuration manifest (pure parts)."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from etlrouter.operator.inject import SIDECAR_NAME, apply_patch
from etlrouter.operator.webhook import (
    MAX_REVIEW_BYTES,
    ReviewError,
    admit,
    parse_review,
    webhook_configuration,
)

ANNOTATIONS = {"etlrouter.io/inject": "true", "etlrouter.io/router": "r:7400", "etlrouter.io/ports": "50051"}


def review(pod: dict[str, Any] | None = None, **request: Any) -> bytes:
    body = {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "u-1",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "operation": "CREATE",
            "namespace": "ns",
            "object": pod
            if pod is not None
            else {"metadata": {"annotations": ANNOTATIONS}, "spec": {"containers": [{"name": "app"}]}},
            **request,
        },
    }
    return json.dumps(body).encode()


def test_annotated_pod_gets_a_json_patch_that_adds_the_sidecar() -> None:
    request = parse_review(review())
    answer, outcome = admit(request, image="img:1", failure_policy="Ignore")
    assert outcome == "injected"
    response = answer["response"]
    assert answer["apiVersion"] == "admission.k8s.io/v1" and answer["kind"] == "AdmissionReview"
    assert response["uid"] == "u-1" and response["allowed"] is True and response["patchType"] == "JSONPatch"
    patch = json.loads(base64.b64decode(response["patch"]))
    patched = apply_patch(request.object, patch)
    assert [c["name"] for c in patched["spec"]["containers"]] == ["app", SIDECAR_NAME]
    assert patched["spec"]["containers"][1]["image"] == "img:1"


def test_pods_without_the_annotation_and_injected_pods_are_left_alone() -> None:
    plain = parse_review(review({"metadata": {}, "spec": {"containers": [{"name": "app"}]}}))
    assert admit(plain, image="i", failure_policy="Fail") == (
        {
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "response": {"uid": "u-1", "allowed": True},
        },
        "skipped",
    )
    done = parse_review(
        review({"metadata": {"annotations": ANNOTATIONS}, "spec": {"containers": [{"name": SIDECAR_NAME}]}})
    )
    answer, outcome = admit(done, image="i", failure_policy="Fail")
    assert outcome == "already-injected" and "patch" not in answer["response"]


def test_bad_annotations_follow_the_failure_policy() -> None:
    pod = {"metadata": {"annotations": {"etlrouter.io/inject": "true"}}, "spec": {"containers": []}}
    request = parse_review(review(pod))
    denied, outcome = admit(request, image="i", failure_policy="Fail")
    assert outcome == "rejected"
    assert denied["response"]["allowed"] is False
    assert "etlrouter.io/router is required" in denied["response"]["status"]["message"]
    allowed, outcome = admit(request, image="i", failure_policy="Ignore")
    assert outcome == "not-injected" and allowed["response"]["allowed"] is True
    assert "etlrouter.io/router is required" in allowed["response"]["warnings"][0]


def test_v1beta1_reviews_are_answered_in_kind() -> None:
    body = json.loads(review())
    body["apiVersion"] = "admission.k8s.io/v1beta1"
    answer, _ = admit(parse_review(json.dumps(body).encode()), image="i", failure_policy="Ignore")
    assert answer["apiVersion"] == "admission.k8s.io/v1beta1"


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b"{not json", "not valid JSON"),
        (b"[]", "must be a JSON object"),
        (b'{"kind": "Pod"}', "kind: expected AdmissionReview"),
        (b'{"kind": "AdmissionReview", "apiVersion": "v1"}', "apiVersion: expected admission.k8s.io/v1"),
        (b'{"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1"}', "request: missing"),
        (review(uid=""), "request.uid: missing"),
        (review(kind="Pod"), "request.kind.kind: missing"),
        (review(operation=None), "request.operation: missing"),
        (review(object=None), "request.object: missing or not an object for CREATE"),
        (b" " * (MAX_REVIEW_BYTES + 1), "the limit is"),
    ],
)
def test_malformed_reviews_name_the_field(body: bytes, needle: str) -> None:
    with pytest.raises(ReviewError, match=needle.replace(".", r"\.")):
        parse_review(body)


def test_webhook_configuration_url_or_service() -> None:
    by_url = webhook_configuration(b"CA", "Fail", url="https://127.0.0.1:9443/inject")
    hook = by_url["webhooks"][0]
    assert hook["clientConfig"] == {
        "caBundle": base64.b64encode(b"CA").decode(),
        "url": "https://127.0.0.1:9443/inject",
    }
    assert hook["failurePolicy"] == "Fail" and hook["sideEffects"] == "None"
    assert hook["rules"][0]["resources"] == ["pods"] and hook["rules"][0]["operations"] == ["CREATE"]
    by_service = webhook_configuration(b"CA", "Ignore", service=("ops", "etlrouter-webhook"))
    assert by_service["webhooks"][0]["clientConfig"]["service"] == {
        "namespace": "ops",
        "name": "etlrouter-webhook",
        "path": "/inject",
    }
    assert (
        by_service["webhooks"][0]["namespaceSelector"]["matchExpressions"][0]["key"]
        == "etlrouter.io/injection"
    )
    with pytest.raises(ValueError, match="exactly one"):
        webhook_configuration(b"CA", "Fail")
