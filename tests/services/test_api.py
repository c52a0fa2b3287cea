"""The HTTP contract: status codes, authentication and ownership, pagination, idempotency, oversize and malformed
bodies, logs. FastAPI's TestClient over a SQLite store (and, for bad input that must never be a 5xx, over SQLite and
PostgreSQL); no Ray (a fake launcher serves logs)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from jobs.spec import parse_spec
from services.api import create_app
from services.door import DoorCheck
from services.settings import Principal, ServiceSettings
from services.store import Decision, Store
from tests.services.fakes import FakeLauncher

EXAMPLES = Path(__file__).resolve().parents[2] / "jobs" / "examples"
SPEC = """\
name: api-test
model: {variant: vae, architecture: mlp, latent_dim: 4}
train: {steps: 10, batch_size: 8}
resources: {workers: 2, cpus_per_worker: 1.5}
"""
TOKENS = {"alice": "alice-token-123", "bob": "bob-token-4567", "root": "root-token-890"}
LIMIT = 4096


@pytest.fixture
def store(tmp_path):
    s = Store(f"sqlite:///{tmp_path / 'api.db'}")
    yield s
    s.close()


@pytest.fixture
def settings(tmp_path):
    return ServiceSettings(
        home=tmp_path,
        db_url="unused",
        tokens=(
            Principal("alice", "user", TOKENS["alice"]),
            Principal("bob", "user", TOKENS["bob"]),
            Principal("root", "admin", TOKENS["root"]),
        ),
        max_request_bytes=LIMIT,
        max_attempts=2,
    )


@pytest.fixture
def launcher():
    return FakeLauncher()


@pytest.fixture
def client(store, settings, launcher):
    with TestClient(create_app(store, settings, launcher=launcher)) as c:
        yield c


def auth(who: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[who]}"}


def post_job(client, who="alice", spec=SPEC, **body):
    return client.post("/jobs", json={"spec": spec, **body}, headers=auth(who))


def make_running(store: Store, job_id: str) -> None:
    started = store.admit(lambda j, h: Decision.start("test")).started
    assert started.id == job_id
    store.transition(job_id, "running", "test", expect=("starting",))


# --- service pages -----------------------------------------------------------------------------------------------


def test_health_and_openapi_need_no_token(client):
    health = client.get("/healthz")
    assert health.status_code == 200 and health.json()["status"] == "ok" and health.json()["database"] == "sqlite"
    schema = client.get("/openapi.json").json()
    assert {
        "/jobs",
        "/jobs/{job_id}",
        "/jobs/{job_id}/cancel",
        "/jobs/{job_id}/retry",
        "/jobs/{job_id}/logs",
        "/healthz",
    } <= set(schema["paths"])
    assert client.get("/docs").status_code == 200


def test_an_app_without_tokens_is_refused(store, settings):
    with pytest.raises(ValueError, match="no API tokens"):
        create_app(store, ServiceSettings(home=settings.home, db_url="x"))


# --- authentication ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method,path",
    [
        ("get", "/jobs"),
        ("post", "/jobs"),
        ("get", "/jobs/x"),
        ("post", "/jobs/x/cancel"),
        ("post", "/jobs/x/retry"),
        ("get", "/jobs/x/logs"),
    ],
)
def test_no_or_unknown_token_is_401(client, method, path):
    response = getattr(client, method)(path)
    assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
    bad = getattr(client, method)(path, headers={"Authorization": "Bearer not-a-token"})
    assert bad.status_code == 401 and bad.json()["detail"] == "unknown token"


def test_users_see_and_cancel_only_their_own_jobs_and_admins_all(client):
    alice_job = post_job(client, "alice").json()["id"]
    bob_job = post_job(client, "bob").json()["id"]
    assert client.get(f"/jobs/{alice_job}", headers=auth("bob")).status_code == 404
    assert client.post(f"/jobs/{alice_job}/cancel", headers=auth("bob")).status_code == 404
    assert client.post(f"/jobs/{alice_job}/retry", headers=auth("bob")).status_code == 404
    assert client.get(f"/jobs/{alice_job}/logs", headers=auth("bob")).status_code == 404
    assert [j["id"] for j in client.get("/jobs", headers=auth("bob")).json()["items"]] == [bob_job]
    assert client.get("/jobs?owner=alice", headers=auth("bob")).status_code == 403
    assert client.get(f"/jobs/{alice_job}", headers=auth("root")).status_code == 200
    assert {j["id"] for j in client.get("/jobs", headers=auth("root")).json()["items"]} == {alice_job, bob_job}
    assert [j["id"] for j in client.get("/jobs?owner=bob", headers=auth("root")).json()["items"]] == [bob_job]
    cancelled = client.post(f"/jobs/{alice_job}/cancel", headers=auth("root"))
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"


def test_unknown_ids_are_404_not_500(client):
    for method, path in [
        ("get", "/jobs/nope"),
        ("post", "/jobs/nope/cancel"),
        ("post", "/jobs/nope/retry"),
        ("get", "/jobs/nope/logs"),
    ]:
        response = getattr(client, method)(path, headers=auth("root"))
        assert response.status_code == 404 and "nope" in response.json()["detail"]


# --- submission --------------------------------------------------------------------------------------------------


def test_submit_queues_the_spec_as_written_and_details_show_events(client):
    response = post_job(client, priority_class="normal")
    assert response.status_code == 201
    job = response.json()
    assert job["state"] == "queued" and job["owner"] == "alice" and job["priority"] == 0 and job["name"] == "api-test"
    assert (
        job["resources"] == {"CPU": 3.0, "GPU": 0.0} and job["max_attempts"] == 2 and job["cancel_requested"] is False
    )
    detail = client.get(f"/jobs/{job['id']}", headers=auth("alice")).json()
    assert detail["spec"] == SPEC
    assert [(e["from_state"], e["to_state"]) for e in detail["events"]] == [(None, "queued")]
    assert detail["mlflow_run_id"] is None and detail["model_version"] is None


def test_a_spec_given_as_a_json_object_is_accepted(client):
    spec = {"name": "as-object", "train": {"steps": 5}, "resources": {"workers": 1}}
    response = post_job(client, spec=spec, max_attempts=5)
    assert (
        response.status_code == 201 and response.json()["name"] == "as-object" and response.json()["max_attempts"] == 5
    )


def test_a_malformed_spec_is_422_with_field_errors_and_makes_no_row(client, store):
    bad = SPEC.replace("latent_dim: 4", "latent_dim: 0, colour: red")
    response = post_job(client, spec=bad)
    assert response.status_code == 422
    locs = {e["loc"] for e in response.json()["errors"]}
    assert {"model.latent_dim", "model.colour"} <= locs
    assert "model.latent_dim" in response.json()["detail"]
    for junk in ("name: [unclosed", "", "- just\n- a list\n", "name: x\nkind: sweep\n"):
        assert post_job(client, spec=junk).status_code == 422
    assert store.list_jobs()[1] == 0


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b'{"priority": 1}',
        b'{"spec": "name: x", "colour": 1}',
        b'{"spec": "name: x", "priority": 100000}',
        b'{"spec": 12}',
        b"[]",
    ],
)
def test_malformed_bodies_are_422_and_make_no_row(client, store, body):
    response = client.post("/jobs", content=body, headers=auth("alice") | {"Content-Type": "application/json"})
    assert response.status_code == 422 and response.json()["errors"]
    assert store.list_jobs()[1] == 0


def test_oversize_bodies_are_refused_before_parsing(client, store):
    big_spec = SPEC + "description: " + "x" * LIMIT + "\n"
    declared = post_job(client, spec=big_spec)
    assert declared.status_code == 413 and str(LIMIT) in declared.json()["detail"]

    def chunks():  # no Content-Length: the limit is enforced while reading
        yield b'{"spec": "'
        for _ in range(LIMIT // 512 + 2):
            yield b"x" * 512
        yield b'"}'

    streamed = client.post("/jobs", content=chunks(), headers=auth("alice") | {"Content-Type": "application/json"})
    assert streamed.status_code == 413
    assert store.list_jobs()[1] == 0
    assert post_job(client).status_code == 201  # a body under the limit still goes through


def test_idempotency_key_returns_the_same_job(client, store):
    first = post_job(client, idempotency_key="abc")
    again = post_job(client, idempotency_key="abc")
    assert first.status_code == 201 and again.status_code == 200 and again.json()["id"] == first.json()["id"]
    by_header = client.post("/jobs", json={"spec": SPEC}, headers=auth("alice") | {"Idempotency-Key": "abc"})
    assert by_header.status_code == 200 and by_header.json()["id"] == first.json()["id"]
    other_user = post_job(client, "bob", idempotency_key="abc")
    assert other_user.status_code == 201 and other_user.json()["id"] != first.json()["id"]
    different = post_job(client, spec=SPEC.replace("steps: 10", "steps: 11"), idempotency_key="abc")
    assert different.status_code == 409 and first.json()["id"] in different.json()["detail"]
    clash = client.post(
        "/jobs", json={"spec": SPEC, "idempotency_key": "x"}, headers=auth("alice") | {"Idempotency-Key": "y"}
    )
    assert clash.status_code == 422
    assert store.list_jobs()[1] == 2


def test_the_stored_spec_json_is_what_the_job_will_parse(store, settings):
    """The dispatcher hands spec_json to `python -m jobs.run`: it must validate to the same spec. (The examples' data
    sets are not pushed here: the door's data check is left out.)"""
    client = TestClient(create_app(store, settings, door_check=lambda spec: DoorCheck()))
    for path in sorted(EXAMPLES.glob("*.yaml")):
        text = path.read_text()
        response = post_job(client, "root", spec=text)
        assert response.status_code == 201, (path.name, response.json())
        job = store.get(response.json()["id"])
        assert job.spec_text == text
        assert parse_spec(job.spec_json).model_dump() == parse_spec(text).model_dump(), path.name


def test_an_injected_validator_is_used(store, settings):
    class Tiny:
        name, kind = "tiny", "train"

        def resource_request(self):
            return {"CPU": 1.0}

        def model_dump(self, mode="json"):
            return {"name": "tiny"}

    def validate(text, source):
        if text != "ok":
            raise ValueError("only 'ok' is a spec here")
        return Tiny()

    with TestClient(create_app(store, settings, validate=validate)) as c:
        assert post_job(c, spec="ok").json()["resources"] == {"CPU": 1.0}
        refused = post_job(c, spec="nope")
        assert refused.status_code == 422 and refused.json()["errors"] == [
            {"loc": "<spec>", "msg": "only 'ok' is a spec here"}
        ]


# --- listing -----------------------------------------------------------------------------------------------------


def test_listing_pages_and_filters(client, store):
    ids = [post_job(client, spec=SPEC.replace("api-test", f"n{i % 2}")).json()["id"] for i in range(7)]
    client.post(f"/jobs/{ids[0]}/cancel", headers=auth("alice"))
    page1 = client.get("/jobs?limit=3", headers=auth("alice")).json()
    assert page1["total"] == 7 and page1["next_offset"] == 3 and [j["id"] for j in page1["items"]] == ids[::-1][:3]
    page3 = client.get("/jobs?limit=3&offset=6", headers=auth("alice")).json()
    assert [j["id"] for j in page3["items"]] == [ids[0]] and page3["next_offset"] is None
    assert client.get("/jobs?state=cancelled", headers=auth("alice")).json()["total"] == 1
    assert client.get("/jobs?state=queued,cancelled", headers=auth("alice")).json()["total"] == 7
    assert client.get("/jobs?state=queued&state=cancelled", headers=auth("alice")).json()["total"] == 7
    assert client.get("/jobs?name=n1", headers=auth("alice")).json()["total"] == 3
    assert client.get("/jobs?state=done", headers=auth("alice")).status_code == 422
    assert client.get("/jobs?limit=0", headers=auth("alice")).status_code == 422
    assert client.get("/jobs?limit=501", headers=auth("alice")).status_code == 422
    assert client.get("/jobs?offset=-1", headers=auth("alice")).status_code == 422


def test_cursor_pages_walk_the_listing_once_and_the_count_is_bounded(client, store, monkeypatch):
    import services.api

    ids = [post_job(client, spec=SPEC.replace("api-test", f"n{i % 2}")).json()["id"] for i in range(7)]
    seen, cursor, pages = [], None, 0
    while True:
        page = client.get("/jobs", params={"limit": 3, **({"cursor": cursor} if cursor else {})}, headers=auth("alice"))
        assert page.status_code == 200, page.text
        page = page.json()
        seen += [j["id"] for j in page["items"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ids[::-1] and pages == 3
    named = client.get("/jobs", params={"name": "n0", "limit": 2}, headers=auth("alice")).json()
    rest = client.get("/jobs", params={"name": "n0", "cursor": named["next_cursor"]}, headers=auth("alice")).json()
    assert [j["id"] for j in named["items"] + rest["items"]] == ids[::-2] and rest["next_cursor"] is None
    for bad in ("-1", "abc", "1" * 20):
        answer = client.get("/jobs", params={"cursor": bad}, headers=auth("alice"))
        assert answer.status_code == 422 and "cursor" in answer.text, bad
    monkeypatch.setattr(services.api, "MAX_COUNTED", 5)
    capped = client.get("/jobs?limit=2", headers=auth("alice")).json()
    assert (capped["total"], capped["total_exact"]) == (5, False)
    assert client.get("/jobs?name=n1", headers=auth("alice")).json()["total_exact"] is True


# --- cancel and retry --------------------------------------------------------------------------------------------


def test_cancel_and_retry_follow_the_state_machine(client, store):
    queued = post_job(client).json()["id"]
    cancelled = client.post(f"/jobs/{queued}/cancel", headers=auth("alice"))
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    assert client.post(f"/jobs/{queued}/cancel", headers=auth("alice")).status_code == 409
    retried = client.post(f"/jobs/{queued}/retry", headers=auth("alice"))
    assert retried.status_code == 200 and retried.json()["state"] == "queued"
    assert client.post(f"/jobs/{queued}/retry", headers=auth("alice")).status_code == 409

    make_running(store, queued)
    pending = client.post(f"/jobs/{queued}/cancel", headers=auth("alice"))
    assert pending.status_code == 202
    assert pending.json()["state"] == "running" and pending.json()["cancel_requested"] is True
    events = client.get(f"/jobs/{queued}", headers=auth("alice")).json()["events"]
    assert [e["to_state"] for e in events] == ["queued", "cancelled", "queued", "starting", "running"]


# --- logs and progress -------------------------------------------------------------------------------------------


def test_logs_and_progress_come_from_the_ray_job(client, store, launcher):
    job_id = post_job(client).json()["id"]
    assert client.get(f"/jobs/{job_id}/logs", headers=auth("alice")).text == ""  # not started yet
    make_running(store, job_id)
    launcher.jobs[job_id] = {
        "status": "RUNNING",
        "message": None,
        "logs": 'starting\nAEFORGE_PROGRESS {"step": 3, "total": 10}\n',
    }
    logs = client.get(f"/jobs/{job_id}/logs", headers=auth("alice"))
    assert logs.status_code == 200 and logs.headers["content-type"].startswith("text/plain")
    assert logs.text == "starting\nstep 3/10\n"  # readable: the progress line as a step line
    full = client.get(f"/jobs/{job_id}/logs?full=true", headers=auth("alice"))
    assert full.text == launcher.jobs[job_id]["logs"]
    detail = client.get(f"/jobs/{job_id}?progress=true", headers=auth("alice")).json()
    assert detail["progress"] == {"step": 3, "total": 10}
    assert detail["phase"] == {"phase": "training", "step": 3, "total": 10}
    assert client.get(f"/jobs/{job_id}/logs?attempt=2", headers=auth("alice")).status_code == 404

    store.transition(job_id, "succeeded", "done", expect=("running",))
    launcher.set(job_id, "SUCCEEDED")
    followed = client.get(f"/jobs/{job_id}/logs?follow=true", headers=auth("alice"))
    assert followed.status_code == 200 and followed.text == "starting\nstep 3/10\n"  # streamed, ended with the job
    followed = client.get(f"/jobs/{job_id}/logs?follow=true&full=true", headers=auth("alice"))
    assert "AEFORGE_PROGRESS" in followed.text


def test_logs_mask_the_services_secrets(client, store, launcher, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "leaky-secret-999")
    job_id = post_job(client).json()["id"]
    make_running(store, job_id)
    launcher.jobs[job_id] = {"status": "RUNNING", "message": None, "logs": "key is leaky-secret-999\n"}
    text = client.get(f"/jobs/{job_id}/logs", headers=auth("alice")).text
    assert "leaky-secret-999" not in text and "***" in text


def test_logs_without_ray_are_503(store, settings):
    with TestClient(create_app(store, settings)) as c:
        job_id = post_job(c).json()["id"]
        response = c.get(f"/jobs/{job_id}/logs", headers=auth("alice"))
        assert response.status_code == 503 and "Ray" in response.json()["detail"]


# --- bad input is a 4xx naming its field, never a 5xx, on SQLite and PostgreSQL (issue 9) --------------------------


@pytest.fixture
def roomy_settings(settings):
    """Room for bodies past the parsers' limits (the size limit is tested above)."""
    return dataclasses.replace(settings, max_request_bytes=4 * 1024 * 1024)


@pytest.fixture
def roomy_client(store, roomy_settings, launcher):
    with TestClient(create_app(store, roomy_settings, launcher=launcher)) as c:
        yield c


@pytest.fixture
def any_client(store_url, roomy_settings, launcher):
    """The API over a store on each backend (the conftest's store_url: SQLite, then PostgreSQL)."""
    s = Store(store_url)
    with TestClient(create_app(s, roomy_settings, launcher=launcher)) as c:
        yield c, s
    s.close()


def fields_of(response) -> dict[str, str]:
    return {e["loc"]: e["msg"] for e in response.json()["errors"]}


def test_deeply_nested_specs_and_bodies_are_4xx_with_the_documented_body(roomy_client, store):
    client = roomy_client
    deep_yaml = post_job(client, spec="[" * 5000 + "]" * 5000)
    assert deep_yaml.status_code == 422 and "nested too deeply" in fields_of(deep_yaml)["<file>"]
    # As a JSON object: nested past what the JSON parser takes, then just under it (where the spec is parsed again).
    deep_json = client.post(
        "/jobs",
        content='{"spec": {"name": "x", "description": ' + "[" * 100_000 + "]" * 100_000 + "}}",
        headers=auth("alice") | {"Content-Type": "application/json"},
    )
    assert deep_json.status_code == 400 and fields_of(deep_json) == {"body": "it is nested too deeply"}
    assert deep_json.json()["detail"].startswith("the request body cannot be read")
    for depth in (300, 600, 900, 990):
        nested = "[" * depth + "]" * depth
        for body in ('{"spec": {"name": "x", "description": %s}}', '{"spec": %s}', '{"spec": "name: x\\nd: %s"}'):
            response = client.post(
                "/jobs", content=body % nested, headers=auth("alice") | {"Content-Type": "application/json"}
            )
            assert response.status_code in (400, 422) and response.json()["errors"], (depth, body, response.text)
    huge_int = client.post(
        "/jobs",
        content='{"spec": "name: x", "priority": ' + "9" * 5000 + "}",
        headers=auth("alice") | {"Content-Type": "application/json"},
    )
    assert huge_int.status_code == 400 and "4300 digits" in fields_of(huge_int)["body"]
    assert store.list_jobs()[1] == 0


def test_a_cursor_past_every_job_lists_from_the_newest_on_both_stores(any_client):
    client, _ = any_client
    ids = [post_job(client).json()["id"] for _ in range(2)]
    for cursor in ("3000000000", str(2**63 - 1)):  # past PostgreSQL's 32-bit seq (a 500 once), and SQLite's
        page = client.get("/jobs", params={"cursor": cursor}, headers=auth("alice"))
        assert page.status_code == 200 and [j["id"] for j in page.json()["items"]] == ids[::-1], page.text
    assert client.get("/jobs", params={"cursor": "9" * 19}, headers=auth("alice")).status_code == 422


def test_listing_offsets_beyond_the_bound_are_422_on_both_stores(any_client):
    from services.api import MAX_OFFSET

    client, _ = any_client
    for offset in (2**63, 2**63 - 1, 2**62, MAX_OFFSET + 1):
        response = client.get(f"/jobs?offset={offset}", headers=auth("root"))
        assert response.status_code == 422 and "query.offset" in fields_of(response), offset
    last = client.get(f"/jobs?offset={MAX_OFFSET}", headers=auth("root"))
    assert last.status_code == 200 and last.json()["items"] == [] and last.json()["next_offset"] is None


def test_nul_in_a_job_id_key_or_filter_is_a_4xx_on_both_stores(any_client):
    client, store = any_client
    job_id = post_job(client).json()["id"]
    for method, path in [
        ("get", "/jobs/%00"),
        ("get", f"/jobs/{job_id}%00"),
        ("post", "/jobs/a%00b/cancel"),
        ("post", "/jobs/%00/retry"),
        ("get", "/jobs/%00/logs"),
    ]:
        response = getattr(client, method)(path, headers=auth("root"))
        assert response.status_code == 404 and response.json()["detail"].startswith("no job"), path
    in_body = post_job(client, idempotency_key="key\x00")
    assert in_body.status_code == 422 and "control characters" in fields_of(in_body)["body.idempotency_key"]
    in_header = client.post("/jobs", json={"spec": SPEC}, headers=auth("alice") | {"Idempotency-Key": "k\x00"})
    assert in_header.status_code == 422 and "control characters" in fields_of(in_header)["header.Idempotency-Key"]
    for query in ("name=a%00", "owner=%00", "name=n&owner=%01"):
        response = client.get(f"/jobs?{query}", headers=auth("root"))
        assert response.status_code == 422 and "control characters" in response.json()["detail"], query
    assert client.get("/jobs?state=queued%00", headers=auth("root")).status_code == 422
    assert store.list_jobs()[1] == 1


def test_numbers_in_a_spec_are_finite_and_the_response_keeps_its_schema(any_client):
    client, store = any_client
    cases = {
        "model.beta": "name: b\nmodel: {variant: beta_vae, beta: .inf, architecture: mlp}\n",
        "resources.cpus_per_worker": "name: c\nresources: {cpus_per_worker: .inf}\n",
        "resources.gpus_per_worker": "name: g\nresources: {gpus_per_worker: .nan}\n",
        "train.optimizer.betas[1]": "name: o\ntrain: {optimizer: {betas: [0.9, .inf]}}\n",
        "sweep.beta[0]": "name: s\nkind: sweep\nmodel: {variant: beta_vae}\nsweep: {beta: [-.inf]}\n",
        "train.max_hours": "name: h\ntrain: {max_hours: .inf}\n",
    }
    for loc, spec in cases.items():
        response = post_job(client, spec=spec)
        assert response.status_code == 422, (loc, response.text)
        assert fields_of(response).get(loc, "").startswith("Input should be a finite number, got "), (
            loc,
            response.json(),
        )
    as_object = client.post(
        "/jobs",
        content='{"spec": {"name": "x", "model": {"variant": "beta_vae", "beta": Infinity}}}',
        headers=auth("alice") | {"Content-Type": "application/json"},
    )
    assert as_object.status_code == 422 and "model.beta" in fields_of(as_object)
    # A product of finite numbers that overflows (workers x CPUs) is refused by the bounds on each.
    overflow = post_job(client, spec={"name": "x", "resources": {"workers": 10**6, "cpus_per_worker": 1e308}})
    assert overflow.status_code == 422 and {"resources.workers", "resources.cpus_per_worker"} <= set(
        fields_of(overflow)
    )
    assert store.list_jobs()[1] == 0


def test_a_huge_sweep_is_refused_at_once_naming_sweep(roomy_client, store):
    client = roomy_client
    import time

    values = ", ".join(str(i) for i in range(1, 201))
    spec = (
        f"name: big\nkind: sweep\nmodel: {{variant: beta_vae}}\n"
        f"sweep: {{beta: [{values}], latent_dim: [{values}], seed: [{values}]}}\n"
    )
    started = time.perf_counter()
    response = post_job(client, spec=spec)
    assert time.perf_counter() - started < 2.0
    assert response.status_code == 422
    msg = fields_of(response)["sweep"]
    assert "8,000,000 trials" in msg and "200 beta x 200 latent_dim x 200 seed" in msg and "10,000" in msg
    ranged = post_job(
        client,
        spec="name: r\nkind: sweep\nmodel: {variant: beta_vae}\nsweep: {beta: {start: 0, stop: 1, num: 100000000}}\n",
    )
    assert ranged.status_code == 422 and "sweep.beta.num" in fields_of(ranged)
    assert store.list_jobs()[1] == 0


def test_steps_and_epochs_are_bounded_and_max_hours_is_stored(client, store):
    too_long = post_job(client, spec={"name": "x", "train": {"steps": 10**30}})
    assert too_long.status_code == 422 and "less than or equal to 1000000000" in fields_of(too_long)["train.steps"]
    epochs = post_job(client, spec={"name": "x", "train": {"epochs": 10**7}})
    assert epochs.status_code == 422 and "train.epochs" in fields_of(epochs)
    for bad in (0, -1, "soon"):
        assert "train.max_hours" in fields_of(post_job(client, spec={"name": "x", "train": {"max_hours": bad}}))
    ok = post_job(client, spec={"name": "x", "train": {"steps": 10**9, "max_hours": 1.5}})
    assert ok.status_code == 201
    assert json.loads(store.get(ok.json()["id"]).spec_json)["train"]["max_hours"] == 1.5


def test_the_same_idempotency_key_with_other_max_attempts_is_409(client, store):
    first = post_job(client, idempotency_key="attempts", max_attempts=3)
    assert post_job(client, idempotency_key="attempts", max_attempts=3).status_code == 200
    other = post_job(client, idempotency_key="attempts", max_attempts=4)
    assert other.status_code == 409 and first.json()["id"] in other.json()["detail"]
    defaulted = post_job(client, idempotency_key="attempts")  # the service's default is 2, not 3
    assert defaulted.status_code == 409
    assert store.list_jobs()[1] == 1


def test_the_openapi_document_shows_the_real_error_bodies(roomy_client):
    client = roomy_client
    doc = client.get("/openapi.json").json()
    error_ref = "#/components/schemas/ErrorOut"
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            for status, answer in operation["responses"].items():
                if status.startswith(("4", "5")):
                    assert answer["content"]["application/json"]["schema"]["$ref"] == error_ref, (method, path, status)
            if operation.get("parameters") or operation.get("requestBody"):
                assert "422" in operation["responses"], (method, path)
    submit = doc["paths"]["/jobs"]["post"]["responses"]
    assert {"400", "401", "409", "413", "422"} <= set(submit)
    assert "403" in doc["paths"]["/jobs"]["get"]["responses"] and "503" in doc["paths"]["/healthz"]["get"]["responses"]
    [offset] = [p for p in doc["paths"]["/jobs"]["get"]["parameters"] if p["name"] == "offset"]
    assert offset["schema"]["maximum"] < 2**63  # within both databases' integers
    unreadable = client.post(
        "/jobs",
        content='{"spec": ' + "[" * 100_000 + "]" * 100_000 + "}",
        headers=auth("alice") | {"Content-Type": "application/json"},
    )
    assert unreadable.status_code == 400 and set(unreadable.json()) == {"detail", "errors"}
    wrong_method = client.delete("/jobs", headers=auth("alice"))
    assert wrong_method.status_code == 405 and set(wrong_method.json()) == {"detail", "errors"}


def test_text_the_store_cannot_keep_is_a_422_even_past_the_api_checks(store_url, settings):
    class Unstorable:  # what a looser injected validator might let through
        name, kind = "bad\x00name", "train"

        def resource_request(self):
            return {"CPU": 1.0}

        def model_dump(self, mode="json"):
            return {"name": self.name}

    s = Store(store_url)
    with TestClient(create_app(s, settings, validate=lambda text, source: Unstorable())) as c:
        response = post_job(c)
        assert response.status_code == 422 and "cannot be stored" in fields_of(response)["name"]
        assert s.list_jobs()[1] == 0
    s.close()


# --- issue 19: smaller holes -----------------------------------------------------------------------------------------


def test_options_lists_every_method_of_the_path(client):
    response = client.options("/jobs")
    assert response.status_code == 204
    assert set(response.headers["allow"].split(", ")) == {"GET", "POST", "OPTIONS"}
    wrong = client.put("/jobs", headers=auth("alice"))  # a method the path does not take: 405, with Allow
    assert wrong.status_code == 405 and "POST" in wrong.headers["allow"] and wrong.json()["detail"]


def test_following_the_logs_of_a_job_that_never_starts_ends_after_a_bound_with_heartbeats(client, monkeypatch):
    from services import api

    monkeypatch.setattr(api, "FOLLOW_HEARTBEAT_S", 0.2)
    monkeypatch.setattr(api, "FOLLOW_WAIT_LIMIT_S", 1.5)
    job_id = post_job(client).json()["id"]  # queued, and no dispatcher here: it never starts
    followed = client.get(f"/jobs/{job_id}/logs?follow=true", headers=auth("alice"))
    lines = followed.text.splitlines()
    assert followed.status_code == 200
    assert any(f"job {job_id} is queued" in line for line in lines[:-1]), lines  # a heartbeat while it waits
    assert f"job {job_id} is still queued" in lines[-1] and "aeforge logs -f" in lines[-1]


def test_a_token_in_a_query_string_is_masked_in_the_access_log(caplog):
    import logging

    from services.logs import RedactingFilter

    record = logging.LogRecord(
        "uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5", "GET", "/jobs/x/logs?follow=true&token=alice-token-123", "1.1", 200), None,
    )  # fmt: skip
    assert RedactingFilter().filter(record)
    assert "alice-token-123" not in record.getMessage() and "token=***" in record.getMessage()
    assert record.args[2] == "/jobs/x/logs?follow=true&token=***"  # uvicorn's formatter reads the arguments


@pytest.mark.parametrize("source", ["builtin:../x", "builtin:/abs", "builtin:nope"])
def test_a_builtin_source_is_checked_at_submit(client, source):
    response = post_job(client, spec=SPEC + f"data: {{source: '{source}'}}\n")
    assert response.status_code == 422 and "unknown builtin data set" in fields_of(response)["data.source"]


def test_a_200_kb_spec_is_refused_at_submit_by_field_or_accepted(roomy_client):
    long_description = SPEC + f"description: {'d' * 200_000}\n"
    refused = post_job(roomy_client, spec=long_description)
    assert refused.status_code == 422 and "MLflow" in fields_of(refused)["description"]
    commented = SPEC + "".join(f"# note {i:06d}: {'c' * 50}\n" for i in range(3_500))  # 200 KB, a small spec
    assert len(commented) > 200_000 and post_job(roomy_client, spec=commented).status_code == 201


def test_a_job_that_cannot_fit_the_largest_node_is_refused_at_submit(store, roomy_settings, launcher):
    from services.dispatcher import Dispatcher
    from tests.services.fakes import FakeCluster

    cluster = FakeCluster({"CPU": 64})
    cluster.largest_node_memory = 2 * 1024**3  # as RayClusterView records it
    dispatcher = Dispatcher(store, cluster, launcher, environ={})
    with TestClient(create_app(store, roomy_settings, launcher=launcher, dispatcher=dispatcher)) as c:
        huge = SPEC.replace("latent_dim: 4}", "latent_dim: 4, hidden_dims: [65536, 65536]}")
        refused = post_job(c, spec=huge)
        assert refused.status_code == 422
        assert "largest node has 2.0 GiB" in fields_of(refused)["train.batch_size"]
        assert post_job(c).status_code == 201


# --- the data check at the door ----------------------------------------------------------------------------------


def test_submit_refuses_a_spec_whose_data_is_missing_as_validate_does(client, tmp_path):
    missing = tmp_path / "nothing.npz"
    response = post_job(client, spec=f"name: d\ndata: {{source: {missing}}}\n", who="root")
    assert response.status_code == 422, response.text
    (error,) = response.json()["errors"]
    assert error["loc"] == "data.source" and str(missing) in error["msg"]
    assert not error["msg"].startswith("data.source")  # the path says the field once
    assert "data.source: data.source" not in response.json()["detail"]


def test_submit_checks_a_builtin_source_and_says_what_it_could_not_check(client, monkeypatch):
    ok = post_job(client, spec="name: b\nmodel: {architecture: conv64}\ndata: {source: 'builtin:dsprites'}\n")
    assert ok.status_code == 201 and ok.json()["notes"] == []
    wrong = post_job(client, spec="name: w\nmodel: {architecture: conv28}\ndata: {source: 'builtin:dsprites'}\n")
    assert wrong.status_code == 422 and wrong.json()["errors"][0]["loc"] == "model.architecture"
    # Storage that does not answer: the submission is queued, with a note saying what was not checked.
    from services import door

    monkeypatch.setattr(door, "DOOR_CHECK_S", 2.0)
    monkeypatch.setenv("AEFORGE_STORAGE", "s3://bucket/prefix")
    monkeypatch.setenv("AEFORGE_S3_ENDPOINT_URL", "http://127.0.0.1:9")
    queued = post_job(client, spec="name: s\ndata: {source: 's3://bucket/data.npz'}\n", who="root")
    assert queued.status_code == 201, queued.text
    (note,) = queued.json()["notes"]
    assert "s3://bucket/data.npz" in note and "not checked" in note
