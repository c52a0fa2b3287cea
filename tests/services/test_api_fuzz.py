"""The API against its own OpenAPI document, on SQLite and on PostgreSQL: whatever a client sends, well-formed or
not, the answer is never a 5xx, its status is one the document lists, and its body matches the documented schema.

Two parts: a schemathesis run over every operation (its explicit-example, coverage and fuzzing phases; at most
MAX_EXAMPLES generated cases per operation, derandomized so that every run sends the same requests), and the
inputs that once answered 500 or broke the response schema, replayed through the same checks.
"""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402  (schemathesis brings hypothesis)

from services.api import create_app  # noqa: E402
from services.settings import Principal, ServiceSettings  # noqa: E402
from services.store import Store  # noqa: E402
from tests.services.fakes import FakeLauncher  # noqa: E402

MAX_EXAMPLES = 100
ADMIN = "fuzz-admin-token-1234"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
SPEC = "name: fuzzed\nmodel: {variant: vae, architecture: mlp, latent_dim: 4}\ntrain: {steps: 10, batch_size: 8}\n"

# What a response must satisfy. Not schemathesis's positive/negative data checks: a job spec is text or an object
# whose validity the document cannot express, so "schema-valid but refused" is the API working.
CHECKS = [
    schemathesis.checks.not_a_server_error,
    schemathesis.checks.status_code_conformance,
    schemathesis.checks.content_type_conformance,
    schemathesis.checks.response_headers_conformance,
    schemathesis.checks.response_schema_conformance,
]


def make_app(store, home):
    service = ServiceSettings(
        home=home,
        db_url="unused",
        max_request_bytes=64 * 1024,
        max_attempts=2,
        tokens=(Principal("root", "admin", ADMIN), Principal("alice", "user", "fuzz-user-5678")),
    )
    return create_app(store, service, launcher=FakeLauncher())


# The document does not depend on the store: it is read from an app that never serves a request, and each test
# sends its cases to an app over its own store (SQLite or PostgreSQL).
schema = schemathesis.openapi.from_dict(make_app(None, "/nonexistent").openapi())


@pytest.fixture
def app(store_url, tmp_path):
    store = Store(store_url)
    for owner in ("root", "alice"):  # jobs to find, list, cancel and retry besides the ones the cases submit
        store.submit(
            name="seeded", owner=owner, kind="train", spec_text=SPEC, spec_json="{}", resources={"CPU": 1.0, "GPU": 0.0}
        )
    try:
        yield make_app(store, tmp_path)
    finally:
        store.close()


@pytest.mark.timeout(300)
@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)
def test_no_generated_request_gets_a_5xx_or_an_undocumented_answer(case, app):
    response = case.call(app=app, headers=AUTH)
    case.validate_response(response, checks=CHECKS)


def _case(path: str, method: str, **parts):
    return schema[path][method].Case(**parts)


DEEP = "[" * 5000 + "]" * 5000
GRID = {"beta": [float(b) for b in range(1, 31)], "latent_dim": list(range(1, 31)), "seed": list(range(30))}

# (name, case, expected status): each answered 500, 201 with a body that broke the schema, or 201 for a spec that
# cannot run, before the fixes of issue 9.
KNOWN = [
    ("deep-yaml", lambda: _case("/jobs", "POST", body={"spec": DEEP}), 422),
    ("offset-2**63", lambda: _case("/jobs", "GET", query={"offset": 2**63}), 422),
    ("nul-job-id", lambda: _case("/jobs/{job_id}", "GET", path_parameters={"job_id": "\x00"}), 404),
    ("nul-job-id-cancel", lambda: _case("/jobs/{job_id}/cancel", "POST", path_parameters={"job_id": "a\x00"}), 404),
    ("nul-job-id-retry", lambda: _case("/jobs/{job_id}/retry", "POST", path_parameters={"job_id": "\x00"}), 404),
    ("nul-job-id-logs", lambda: _case("/jobs/{job_id}/logs", "GET", path_parameters={"job_id": "\x00"}), 404),
    ("nul-name-query", lambda: _case("/jobs", "GET", query={"name": "a\x00"}), 422),
    ("nul-owner-query", lambda: _case("/jobs", "GET", query={"owner": "\x00"}), 422),
    ("nul-idempotency-key", lambda: _case("/jobs", "POST", body={"spec": SPEC, "idempotency_key": "k\x00"}), 422),
    (
        "infinite-beta",
        lambda: _case(
            "/jobs", "POST", body={"spec": "name: b\nmodel: {variant: beta_vae, beta: .inf, architecture: mlp}\n"}
        ),
        422,
    ),
    (
        "infinite-cpus",
        lambda: _case("/jobs", "POST", body={"spec": "name: c\nresources: {cpus_per_worker: .inf}\n"}),
        422,
    ),
    (
        "overflowing-cpus",
        lambda: _case(
            "/jobs", "POST", body={"spec": {"name": "c", "resources": {"workers": 10**6, "cpus_per_worker": 1e308}}}
        ),
        422,
    ),
    ("huge-steps", lambda: _case("/jobs", "POST", body={"spec": {"name": "s", "train": {"steps": 10**30}}}), 422),
    (
        "huge-grid",
        lambda: _case(
            "/jobs",
            "POST",
            body={"spec": {"name": "g", "kind": "sweep", "model": {"variant": "beta_vae"}, "sweep": GRID}},
        ),
        422,
    ),
]


@pytest.mark.parametrize("name,make,status", KNOWN, ids=[k[0] for k in KNOWN])
def test_inputs_that_once_failed_get_a_documented_4xx(app, name, make, status):
    case = make()
    response = case.call(app=app, headers=AUTH)
    assert response.status_code == status, (name, response.text[:500])
    case.validate_response(response, checks=CHECKS)
    assert response.json()["detail"]
