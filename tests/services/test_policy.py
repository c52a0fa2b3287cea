"""The queue policy: its file (field-path errors, the last good policy kept on a bad edit, read again when it
changes), who may use which class through the API (403 naming the allowed ones), raw priorities for admins only,
and a job that can never fit its team's quota plus borrowing refused at submission."""

from __future__ import annotations

import os
import time

import pytest
from fastapi.testclient import TestClient

from services.api import create_app
from services.cli_doctor import CheckFailed, check_policy
from services.policy import Policy, PolicyError, PolicySource, parse_policy
from services.settings import Principal, ServiceSettings
from services.store import Store

POLICY = """\
half_life_hours: 12
default_class: normal
teams:
  vision:
    owners: [alice, bob]
    weight: 2
    quota: {cpu: 4, gpu: 0, jobs: 3}
    borrowing_limit: {cpu: 2}
  speech:
    owners: [carol]
classes:
  - {name: low, value: -10}
  - {name: normal, value: 0}
  - {name: urgent, value: 100, preemptible: false, may_preempt: true, teams: [vision]}
  - {name: ops, value: 500, roles: [admin]}
"""
SPEC = """\
name: policy-test
model: {variant: vae, architecture: mlp, latent_dim: 4}
train: {steps: 10, batch_size: 8}
resources: {workers: 2, cpus_per_worker: 1.5}
"""
TOKENS = {"alice": "alice-token-123", "carol": "carol-token-45", "dave": "dave-token-678", "root": "root-token-890"}


def test_without_a_file_every_owner_is_a_team_and_there_is_one_class():
    policy = Policy()
    alice, bob = policy.team_of("alice"), policy.team_of("bob")
    assert alice.name == "@alice" and bob.name == "@bob" and alice.weight == bob.weight == 1.0
    assert not alice.quota.bounded and alice.ceiling("GPU") is None
    assert [c.name for c in policy.classes] == ["normal"] and policy.default_class.value == 0


def test_a_policy_file_gives_teams_weights_quotas_and_classes():
    policy = parse_policy(POLICY, "policy.yaml")
    vision = policy.team_of("bob")
    assert vision.name == "vision" and vision.weight == 2 and vision.quota.resource("CPU") == 4
    assert vision.ceiling("CPU") == 6 and vision.ceiling("GPU") is None  # no GPU borrowing limit: any
    assert policy.team_of("zed").name == "@zed"  # an owner no team names is a team of their own
    assert policy.half_life_s == 12 * 3600
    user = Principal("carol", "user", "x" * 10)
    assert [c.name for c in policy.allowed_classes(user)] == ["low", "normal"]
    assert [c.name for c in policy.allowed_classes(Principal("alice", "user", "y" * 10))] == ["low", "normal", "urgent"]
    assert len(policy.allowed_classes(Principal("root", "admin", "z" * 10))) == 4


@pytest.mark.parametrize(
    ("edit", "path"),
    [
        ("teams: {vision: {owners: [a], colour: red}}", "teams.vision.colour: Extra inputs are not permitted"),
        ("teams: {vision: {quota: {gpu: -1}}}", "teams.vision.quota.gpu: Input should be greater than or equal to 0"),
        ("classes: [{name: urgent, value: 5, teams: [nobody]}]\ndefault_class: urgent", "classes.0.teams: unknown"),
        ("classes: [{name: a}]\ndefault_class: b", "default_class: 'b' is not a class"),
        ("teams: {a: {owners: [x]}, b: {owners: [x]}}", "teams.b.owners: 'x' is already in team a"),
        ("surprise: 1", "surprise: Extra inputs are not permitted"),
        ("[1, 2]", "a policy file is a mapping"),
    ],
)
def test_a_bad_policy_names_the_file_and_the_field(edit, path):
    with pytest.raises(PolicyError) as caught:
        parse_policy(edit, "/etc/aeforge/policy.yaml")
    assert "/etc/aeforge/policy.yaml" in str(caught.value) and path in str(caught.value)


def test_a_bad_edit_keeps_the_last_good_policy_and_a_good_one_is_read_at_once(tmp_path, monkeypatch, caplog):
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    source = PolicySource(path)
    assert source.current().team_of("alice").name == "vision" and source.problem is None

    path.write_text(POLICY.replace("gpu: 0", "gpu: -3"))
    bump_mtime(path)
    kept = source.current()
    assert kept.team_of("alice").name == "vision"
    assert "teams.vision.quota.gpu" in source.problem and "still using the last good policy" in source.problem
    assert "queue policy refused" in caplog.text
    monkeypatch.setenv("AEFORGE_POLICY_FILE", str(path))
    with pytest.raises(CheckFailed, match="teams.vision.quota.gpu"):  # aeforge doctor's check
        check_policy()

    path.write_text(POLICY.replace("owners: [carol]", "owners: [carol, alice2]"))
    bump_mtime(path)
    assert source.current().team_of("alice2").name == "speech" and source.problem is None
    assert "speech" in check_policy()


def test_a_service_does_not_start_on_a_bad_policy(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text("teams: {vision: {weight: 0}}")
    with pytest.raises(PolicyError, match="teams.vision.weight: Input should be greater than 0"):
        PolicySource(path)


def bump_mtime(path):
    """A later modification time: two writes within the file system's time resolution must still be seen."""
    later = time.time() + 5
    os.utime(path, (later, later))


# --- through the API ---------------------------------------------------------------------------------------------


@pytest.fixture
def client(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    store = Store(f"sqlite:///{tmp_path / 'policy.db'}")
    settings = ServiceSettings(
        home=tmp_path,
        db_url="unused",
        tokens=(
            Principal("alice", "user", TOKENS["alice"]),
            Principal("carol", "user", TOKENS["carol"]),
            Principal("dave", "user", TOKENS["dave"]),
            Principal("root", "admin", TOKENS["root"]),
        ),
        policy_file=path,
    )
    with TestClient(create_app(store, settings)) as c:
        yield c, store
    store.close()


def post(client, who, spec=SPEC, **body):
    return client.post("/jobs", json={"spec": spec, **body}, headers={"Authorization": f"Bearer {TOKENS[who]}"})


def test_a_class_the_user_may_not_use_is_a_403_naming_the_allowed_ones(client):
    http, store = client
    refused = post(http, "carol", priority_class="urgent")
    assert refused.status_code == 403
    detail = refused.json()["detail"]
    assert "carol may not use class 'urgent'" in detail and "classes you may use: low, normal" in detail
    assert refused.json()["errors"][0]["loc"] == "priority_class"
    assert store.list_jobs()[1] == 0  # nothing written

    unknown = post(http, "carol", priority_class="vip")
    assert unknown.status_code == 422 and "the classes are low, normal, urgent, ops" in unknown.json()["detail"]

    ok = post(http, "alice", priority_class="urgent")
    assert ok.status_code == 201 and ok.json()["priority"] == 100
    default = post(http, "carol")
    assert default.status_code == 201 and default.json()["priority"] == 0
    events = http.get(f"/jobs/{ok.json()['id']}", headers={"Authorization": f"Bearer {TOKENS['alice']}"}).json()
    assert "in class urgent (priority 100)" in events["events"][0]["reason"]


def test_a_raw_priority_is_for_admins_only(client):
    http, _ = client
    refused = post(http, "carol", priority=1000)
    assert refused.status_code == 403 and "a raw priority is for admins" in refused.json()["detail"]
    assert "low, normal" in refused.json()["detail"]
    admin = post(http, "root", priority=1000)
    assert admin.status_code == 201 and admin.json()["priority"] == 1000
    both = post(http, "root", priority=5, priority_class="ops")
    assert both.status_code == 422 and "not both" in both.json()["detail"]


def test_a_job_that_can_never_fit_its_teams_quota_and_borrowing_is_refused_at_submission(client):
    http, store = client
    big = SPEC.replace("cpus_per_worker: 1.5", "cpus_per_worker: 3.5")  # CPU 7 > quota 4 + borrowing 2
    refused = post(http, "alice", spec=big)
    assert refused.status_code == 422
    assert "team vision may hold at most 6 (quota 4 plus borrowing limit 2)" in refused.json()["detail"]
    assert refused.json()["errors"][0]["loc"] == "resources"
    # No quota for dave's own team: the same job is queued (the cluster's size is the dispatcher's question).
    assert post(http, "dave", spec=big).status_code == 201
    assert store.list_jobs()[1] == 1
