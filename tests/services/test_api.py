"""The HTTP contract: status codes, authentication and ownership, pagination, idempotency, oversize and malformed
bodies, logs. FastAPI's TestClient over a SQLite store; no Ray (a fake launcher serves logs)."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from jobs.spec import parse_spec
from services.api import create_app
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
        tokens=(Principal("alice", "user", TOKENS["alice"]), Principal("bob", "user", TOKENS["bob"]),
                Principal("root", "admin", TOKENS["root"])),
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
    assert {"/jobs", "/jobs/{job_id}", "/jobs/{job_id}/cancel", "/jobs/{job_id}/retry", "/jobs/{job_id}/logs",
            "/healthz"} <= set(schema["paths"])
    assert client.get("/docs").status_code == 200


def test_an_app_without_tokens_is_refused(store, settings):
    with pytest.raises(ValueError, match="no API tokens"):
        create_app(store, ServiceSettings(home=settings.home, db_url="x"))


# --- authentication ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method,path", [("get", "/jobs"), ("post", "/jobs"), ("get", "/jobs/x"),
                                         ("post", "/jobs/x/cancel"), ("post", "/jobs/x/retry"), ("get", "/jobs/x/logs")])
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
    for method, path in [("get", "/jobs/nope"), ("post", "/jobs/nope/cancel"), ("post", "/jobs/nope/retry"),
                         ("get", "/jobs/nope/logs")]:
        response = getattr(client, method)(path, headers=auth("root"))
        assert response.status_code == 404 and "nope" in response.json()["detail"]


# --- submission --------------------------------------------------------------------------------------------------


def test_submit_queues_the_spec_as_written_and_details_show_events(client):
    response = post_job(client, priority=7)
    assert response.status_code == 201
    job = response.json()
    assert job["state"] == "queued" and job["owner"] == "alice" and job["priority"] == 7 and job["name"] == "api-test"
    assert job["resources"] == {"CPU": 3.0, "GPU": 0.0} and job["max_attempts"] == 2 and job["cancel_requested"] is False
    detail = client.get(f"/jobs/{job['id']}", headers=auth("alice")).json()
    assert detail["spec"] == SPEC
    assert [(e["from_state"], e["to_state"]) for e in detail["events"]] == [(None, "queued")]
    assert detail["mlflow_run_id"] is None and detail["model_version"] is None


def test_a_spec_given_as_a_json_object_is_accepted(client):
    spec = {"name": "as-object", "train": {"steps": 5}, "resources": {"workers": 1}}
    response = post_job(client, spec=spec, max_attempts=5)
    assert response.status_code == 201 and response.json()["name"] == "as-object" and response.json()["max_attempts"] == 5


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


@pytest.mark.parametrize("body", [b"{not json", b'{"priority": 1}', b'{"spec": "name: x", "colour": 1}',
                                  b'{"spec": "name: x", "priority": 100000}', b'{"spec": 12}', b"[]"])
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
    clash = client.post("/jobs", json={"spec": SPEC, "idempotency_key": "x"}, headers=auth("alice") | {"Idempotency-Key": "y"})
    assert clash.status_code == 422
    assert store.list_jobs()[1] == 2


def test_the_stored_spec_json_is_what_the_job_will_parse(client, store):
    """The dispatcher hands spec_json to `python -m jobs.run`: it must validate to the same spec."""
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
        assert refused.status_code == 422 and refused.json()["errors"] == [{"loc": "<spec>", "msg": "only 'ok' is a spec here"}]


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
    launcher.jobs[job_id] = {"status": "RUNNING", "message": None,
                             "logs": 'starting\nAEFORGE_PROGRESS {"step": 3, "total": 10}\n'}
    logs = client.get(f"/jobs/{job_id}/logs", headers=auth("alice"))
    assert logs.status_code == 200 and logs.headers["content-type"].startswith("text/plain") and "starting" in logs.text
    detail = client.get(f"/jobs/{job_id}?progress=true", headers=auth("alice")).json()
    assert detail["progress"] == {"step": 3, "total": 10}
    assert client.get(f"/jobs/{job_id}/logs?attempt=2", headers=auth("alice")).status_code == 404

    store.transition(job_id, "succeeded", "done", expect=("running",))
    launcher.set(job_id, "SUCCEEDED")
    followed = client.get(f"/jobs/{job_id}/logs?follow=true", headers=auth("alice"))
    assert followed.status_code == 200 and "AEFORGE_PROGRESS" in followed.text  # streamed, and ended with the job


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
