"""GET /metrics: scraped from the app while jobs go through the queue (a fake Ray: the dispatcher's real policy,
the real store), checking that each number moves by what happened. The counters are per process and shared by
every test in it, so the checks are on differences between two scrapes."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from services.api import create_app
from services.dispatcher import Dispatcher
from tests.services.fakes import FakeCluster, FakeLauncher
from tests.services.test_api import SPEC, auth, post_job, settings, store  # noqa: F401  (fixtures)

BIG_SPEC = SPEC.replace("cpus_per_worker: 1.5", "cpus_per_worker: 64")


def scrape(client) -> dict[tuple[str, frozenset], float]:
    answer = client.get("/metrics")
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(answer.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples, name, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def jobs_gauge(samples, **labels) -> float:
    """aeforge_jobs summed over the labels not given (kind, class)."""
    wanted = set(labels.items())
    return sum(v for (name, got), v in samples.items() if name == "aeforge_jobs" and wanted <= got)


def moved(before, after, name, **labels) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


@pytest.fixture
def queue(store, settings):
    launcher = FakeLauncher()
    dispatcher = Dispatcher(store, FakeCluster({"CPU": 8.0, "GPU": 0.0}), launcher)
    with TestClient(create_app(store, settings, launcher=launcher)) as client:
        yield client, dispatcher, launcher


def test_metrics_follow_jobs_through_the_queue(queue, store):
    client, dispatcher, launcher = queue
    before = scrape(client)
    assert value(before, "aeforge_store_up") == 1.0

    first = post_job(client).json()["id"]
    second = post_job(client, who="bob").json()["id"]
    never = post_job(client, spec=BIG_SPEC).json()["id"]  # the walk fails it for good and goes on
    third = post_job(client).json()["id"]  # waits: the first two hold 6 of 8 CPUs, it asks for 3
    assert post_job(client, spec="name: x\nmodel: {variant: nope}\n").status_code == 422
    queued = scrape(client)
    # No policy file: each owner is a team of their own.
    assert moved(before, queued, "aeforge_job_submissions_total", owner="alice", team="@alice", kind="train") == 3
    assert moved(before, queued, "aeforge_job_submissions_total", owner="bob", team="@bob", kind="train") == 1
    assert moved(before, queued, "aeforge_job_rejections_total", stage="submit", reason="invalid_spec") == 1
    assert jobs_gauge(queued, state="queued", owner="alice", kind="train") == 3
    assert jobs_gauge(queued, state="queued", owner="alice", kind="train", **{"class": "normal"}) == 3
    assert jobs_gauge(queued, state="queued", owner="bob", kind="train") == 1
    assert (
        jobs_gauge(queued, state="queued", team="@alice") == 3 and jobs_gauge(queued, state="queued", team="@bob") == 1
    )

    dispatcher.tick()  # admits the first two; the third waits; the one that can never fit is failed
    launcher.set(first, "RUNNING")
    launcher.set(second, "RUNNING")
    dispatcher.tick()
    running = scrape(client)
    assert moved(before, running, "aeforge_job_admissions_total", kind="train") == 2
    assert moved(before, running, "aeforge_job_rejections_total", stage="admission", reason="never_fits") == 1
    assert moved(before, running, "aeforge_admission_latency_seconds_count", kind="train") == 2
    assert moved(before, running, "aeforge_job_submit_to_start_seconds_count", kind="train") == 2
    assert moved(before, running, "aeforge_dispatcher_pass_seconds_count") == 2
    assert jobs_gauge(running, state="running", owner="alice", kind="train") == 1
    assert jobs_gauge(running, state="running", owner="bob", kind="train") == 1
    assert jobs_gauge(running, state="queued", owner="alice", kind="train") == 1
    assert store.get(never).state == "failed"

    launcher.set(first, "SUCCEEDED", logs="done\n")
    launcher.set(second, "FAILED", message="worker died")  # attempt 1 of 2: re-queued
    dispatcher.tick()
    cancel = client.post(f"/jobs/{third}/cancel", headers=auth("alice"))  # admitted by now: 202
    assert client.post(f"/jobs/{never}/retry", headers=auth("alice")).status_code == 200
    after = scrape(client)
    assert moved(before, after, "aeforge_jobs_finished_total", state="succeeded", kind="train") == 1
    assert moved(before, after, "aeforge_job_start_to_end_seconds_count", kind="train", state="succeeded") == 1
    assert moved(before, after, "aeforge_job_retries_total", cause="failed_attempt", kind="train") == 1
    assert moved(before, after, "aeforge_job_retries_total", cause="user", kind="train") == 1
    assert moved(before, after, "aeforge_http_requests_total", method="POST", route="/jobs", status="201") == 4
    assert moved(before, after, "aeforge_http_requests_total", method="POST", route="/jobs", status="422") == 1
    assert (
        moved(
            before,
            after,
            "aeforge_http_requests_total",
            method="POST",
            route="/jobs/{job_id}/cancel",
            status=str(cancel.status_code),
        )
        == 1
    )
    assert value(after, "aeforge_db_pool_size") >= 1
    assert value(after, "process_resident_memory_bytes") > 0
    # Bounded labels: nothing names a job.
    for name, labels in after:
        assert not any(job_id in str(labels) for job_id in (first, second, third, never)), (name, labels)


def test_jobs_and_submissions_are_counted_per_policy_team(store, settings, tmp_path):
    """A policy file that puts alice and bob in one team: the gauge and the submissions counter show that team; an
    owner the file does not name is still a team of their own; a changed file regroups at the next scrape."""
    import dataclasses

    policy = tmp_path / "policy.yaml"
    policy.write_text("teams:\n  vision:\n    owners: [alice, bob]\n")
    with TestClient(create_app(store, dataclasses.replace(settings, policy_file=policy))) as client:
        before = scrape(client)
        for who in ("alice", "alice", "bob", "root"):
            assert post_job(client, who=who).status_code == 201
        after = scrape(client)
        assert jobs_gauge(after, state="queued", team="vision") == 3
        assert jobs_gauge(after, state="queued", team="vision", owner="alice") == 2
        assert jobs_gauge(after, state="queued", team="vision", owner="bob") == 1
        assert jobs_gauge(after, state="queued", team="@root") == 1
        assert moved(before, after, "aeforge_job_submissions_total", owner="alice", team="vision", kind="train") == 2
        assert moved(before, after, "aeforge_job_submissions_total", owner="bob", team="vision", kind="train") == 1
        assert moved(before, after, "aeforge_job_submissions_total", owner="root", team="@root", kind="train") == 1

        policy.write_text("teams:\n  vision:\n    owners: [alice]\n  speech:\n    owners: [bob, root]\n")
        regrouped = scrape(client)
        assert jobs_gauge(regrouped, state="queued", team="vision") == 2
        assert jobs_gauge(regrouped, state="queued", team="speech") == 2


def test_team_labels_are_bounded_by_the_owner_cap(monkeypatch):
    from services import metrics
    from services.policy import parse_policy

    monkeypatch.setattr(metrics, "owner_label", metrics.BoundedLabel(1))
    policy = parse_policy("teams:\n  vision:\n    owners: [carol]\n", "<test>")
    assert metrics.team_label(policy, "alice") == "@alice"
    assert metrics.team_label(policy, "bob") == metrics.OTHER  # past the cap: no team of their own
    assert metrics.team_label(policy, "carol") == "vision"  # a named team is always shown


def test_owner_labels_are_capped():
    from services.metrics import OTHER, BoundedLabel

    label = BoundedLabel(2)
    assert [label(o) for o in ("a", "b", "c", "a", "d")] == ["a", "b", OTHER, "a", OTHER]


def test_ray_api_errors_are_counted(monkeypatch):
    import requests

    from services import metrics
    from services.dispatcher import LauncherUnavailable, RayJobLauncher

    launcher = RayJobLauncher("http://127.0.0.1:9")

    class Client:
        def get_job_info(self, sid):
            raise requests.ConnectionError("refused")

        def stop_job(self, sid):
            raise RuntimeError("Request failed with status code 500: boom")

    launcher._client = Client()
    unreachable = metrics.RAY_API_ERRORS.labels("info", "unreachable")
    refused = metrics.RAY_API_ERRORS.labels("stop", "refused")
    before = (unreachable._value.get(), refused._value.get())
    with pytest.raises(LauncherUnavailable):
        launcher.info("x")
    launcher._client = Client()
    with pytest.raises(RuntimeError):
        launcher.stop("x")
    assert (unreachable._value.get(), refused._value.get()) == (before[0] + 1, before[1] + 1)


def test_the_grafana_dashboard_uses_only_names_the_service_exports(store):
    import json
    import re
    from pathlib import Path

    from services.metrics import PROCESS_METRICS, make_registry

    exported = set()
    labels: dict[str, set[str]] = {}  # each exported name's labels, to check what a panel groups by
    defined_labels = {m._name: set(m._labelnames) for m in PROCESS_METRICS}
    for family in make_registry(store).collect():
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"]}.get(family.type, [""])
        exported |= {family.name + suffix for suffix in suffixes}
        own = defined_labels.get(family.name, set()).union(*(sample.labels for sample in family.samples))
        labels |= {family.name + suffix: own | ({"le"} if suffix == "_bucket" else set()) for suffix in suffixes}
    dashboard = json.loads((Path(__file__).resolve().parents[2] / "infra/grafana/aeforge-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {name for expr in exprs for name in re.findall(r"\b((?:aeforge|process)_[a-z_]+)\b", expr)}
    assert len(exprs) >= 12 and used, exprs
    assert used <= exported, sorted(used - exported)
    # A panel groups by labels its metrics have (aeforge_jobs by team, say).
    for expr in exprs:
        names = set(re.findall(r"\b((?:aeforge|process)_[a-z_]+)\b", expr))
        grouped = {g.strip() for by in re.findall(r"\bby \(([^)]*)\)", expr) for g in by.split(",")}
        assert grouped <= set().union(*(labels[n] for n in names)), (expr, grouped)
    # Every metric the service defines is on the dashboard (a new one needs a panel).
    defined = {n for n in exported if n.startswith("aeforge_") and not n.endswith(("_count", "_sum"))}
    assert defined <= used, sorted(defined - used)


def test_request_routes_are_the_matched_templates(queue):
    """The route label is the template of the route that answered; a path no route has in full (an unknown path,
    or a known path with a method it does not take: a 405) is 'unmatched'."""
    client, _dispatcher, _launcher = queue
    job_id = post_job(client).json()["id"]
    before = scrape(client)
    assert client.get(f"/jobs/{job_id}", headers=auth("alice")).status_code == 200
    assert client.get("/no/such/path", headers=auth("alice")).status_code == 404
    assert client.delete("/jobs", headers=auth("alice")).status_code == 405
    after = scrape(client)
    requests = "aeforge_http_requests_total"
    assert moved(before, after, requests, method="GET", route="/jobs/{job_id}", status="200") == 1
    assert moved(before, after, requests, method="GET", route="unmatched", status="404") == 1
    assert moved(before, after, requests, method="DELETE", route="unmatched", status="405") == 1
    assert moved(before, after, requests, method="DELETE", route="/jobs", status="405") == 0
