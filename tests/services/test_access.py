"""Users kept apart at submit (services.access): which data a user's job may read, and whose model name it may
register under. The API over a SQLite store (FastAPI's TestClient), storage in a local folder (AEFORGE_STORAGE),
MLflow in a sqlite store or a real server; no Ray.

Every cross-user attempt (at another user's dataset or model name, or at a path or URL outside the allowed prefixes)
goes through ``attempt(...)``, which counts it and whether it was refused; the tally is printed at the end of the
module (``pytest -s``). The only ones let through are bob's after alice shared her dataset."""

from __future__ import annotations

import json
import time

import mlflow
import numpy as np
import pytest
from fastapi.testclient import TestClient

from services import access
from services.access import check_data_source, registered_model_owner
from services.api import create_app
from services.client import AeforgeClient, ApiError
from services.dispatcher import job_environment
from services.settings import Principal, ServiceSettings, SettingsError
from services.store import Store
from tests.fixtures.s3 import free_port
from tests.services.fakes import FakeLauncher
from workers.storage import Storage, StorageUnreachable
from workers.storage.read_access import not_readable_message

TOKENS = {"alice": "alice-token-123", "bob": "bob-token-4567", "root": "root-token-890"}
PUBLIC_S3 = "s3://public-bucket/public/"
TALLY = {"tried": 0, "refused": 0, "allowed": []}


def spec(source: str = "builtin:dsprites", model_name: str | None = None, kind: str = "train") -> str:
    text = (
        f"name: access-test\nkind: {kind}\nmodel: {{variant: beta_vae, architecture: mlp, latent_dim: 4}}\n"
        f"data: {{source: {json.dumps(source)}}}\ntrain: {{steps: 10, batch_size: 8}}\n"
    )
    if kind == "sweep":
        text += "sweep: {beta: [1, 2], metric: {name: eval/elbo, mode: max}}\n"
    if model_name is not None:
        text += f"register: {{model_name: {model_name}}}\n"
    return text


@pytest.fixture(scope="module", autouse=True)
def tally():
    yield
    print(f"\ncross-user attempts: {TALLY['tried']} tried, {TALLY['refused']} refused; allowed: {TALLY['allowed']}")


@pytest.fixture
def env(tmp_path, monkeypatch):
    """Storage in tmp_path/storage; alice's folder, and the shared folder users may read."""
    monkeypatch.setenv("AEFORGE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("AEFORGE_STORAGE", (tmp_path / "storage").as_uri())
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'no-mlflow-yet.db'}")
    (tmp_path / "shared").mkdir()
    (tmp_path / "alice").mkdir()
    return tmp_path


@pytest.fixture
def client(env):
    settings = ServiceSettings(
        home=env / "home",
        db_url="unused",
        max_attempts=2,
        tokens=tuple(Principal(o, "admin" if o == "root" else "user", t) for o, t in TOKENS.items()),
        allowed_data_prefixes=((env / "shared").as_uri() + "/", PUBLIC_S3),
    )
    store = Store(f"sqlite:///{env / 'api.db'}")
    with TestClient(create_app(store, settings, launcher=FakeLauncher())) as c:
        yield c
    store.close()


def submit(client, who: str, text: str):
    return client.post("/jobs", json={"spec": text}, headers={"Authorization": f"Bearer {TOKENS[who]}"})


def attempt(client, who: str, text: str):
    """A cross-user attempt: counted, and whether it was refused."""
    response = submit(client, who, text)
    TALLY["tried"] += 1
    if response.status_code in (403, 409, 503):
        TALLY["refused"] += 1
    else:
        TALLY["allowed"].append((who, text.split("data: ")[1].split("}")[0], response.status_code))
    return response


def refused(response, status: int = 403, loc: str = "data.source") -> str:
    assert response.status_code == status, response.json()
    body = response.json()
    assert [e["loc"] for e in body["errors"]] == [loc] and body["detail"].startswith(f"{loc}: ")
    return body["detail"]


def write_npz(path) -> None:
    """A real (tiny) image archive: submit's door reads the data's header, so an allowed source must be readable."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, images=np.zeros((16, 8, 8), np.uint8))


def push(env, name: str, owner: str | None) -> None:
    data = env / f"{name}.npz"
    write_npz(data)
    Storage.from_settings().push([data], name, format="npz", owner=owner)


# --- data ---------------------------------------------------------------------------------------------------------


def test_a_user_cannot_train_on_another_users_dataset_until_it_is_shared(client, env):
    before = refused(attempt(client, "bob", spec("alice-faces")))  # no such dataset yet
    push(env, "alice-faces", "alice")
    after = refused(attempt(client, "bob", spec("alice-faces")))  # alice's, not shared
    assert before == after  # the same text whether the dataset exists or not
    assert "alice" not in after.replace("alice-faces", "")
    refused(attempt(client, "bob", spec("alice-faces", kind="sweep")))  # a sweep's data is its data.source
    assert submit(client, "alice", spec("alice-faces")).status_code == 201  # her own
    assert submit(client, "root", spec("alice-faces")).status_code == 201  # an admin reads anything

    Storage.from_settings().share("alice-faces", owner="alice")
    assert attempt(client, "bob", spec("alice-faces")).status_code == 201
    assert attempt(client, "bob", spec("alice-faces", kind="sweep")).status_code == 201
    Storage.from_settings().share("alice-faces", False, owner="alice")
    assert refused(attempt(client, "bob", spec("alice-faces"))) == before


def test_missing_foreign_ownerless_and_damaged_datasets_read_the_same(client, env):
    texts = {refused(attempt(client, "bob", spec("ds"))).replace("'ds'", "'X'")}
    push(env, "ds", "alice")
    texts.add(refused(attempt(client, "bob", spec("ds"))).replace("'ds'", "'X'"))
    push(env, "legacy", None)  # pushed before owners were recorded: nobody's, so admins' only
    texts.add(refused(attempt(client, "bob", spec("legacy"))).replace("'legacy'", "'X'"))
    storage = Storage.from_settings()
    storage.put_bytes(b"{not json", "datasets/broken/manifest.json")
    texts.add(refused(attempt(client, "bob", spec("broken"))).replace("'broken'", "'X'"))
    assert len(texts) == 1, texts
    assert submit(client, "root", spec("legacy")).status_code == 201


@pytest.mark.parametrize("form", ["path", "file-url"])
def test_paths_outside_the_allowed_prefixes_are_refused_alike(client, env, form):
    def source(path) -> str:
        return str(path) if form == "path" else path.as_uri()

    target = env / "alice" / "faces.npz"
    missing = refused(attempt(client, "bob", spec(source(target))))
    target.write_bytes(b"alice's data")
    present = refused(attempt(client, "bob", spec(source(target))))
    assert missing == present  # nothing tells whether the file is there
    escape = f"{env / 'shared'}/../alice/faces.npz"
    refused(attempt(client, "bob", spec(escape if form == "path" else "file://" + escape)))
    refused(attempt(client, "bob", spec(source(env / "shared-not-really" / "x.npz"))))  # a prefix is whole parts
    refused(attempt(client, "bob", spec("/etc/passwd" if form == "path" else "file:///etc/passwd")))
    refused(attempt(client, "bob", spec("file://%2E%2E/etc/x" if form == "file-url" else "alice/faces.npz")))
    ok = env / "shared" / "faces.npz"
    write_npz(ok)
    write_npz(env / "shared" / "sub" / "x.npz")
    write_npz(target)
    answer = submit(client, "bob", spec(source(ok)))
    assert answer.status_code == 201, answer.text
    assert submit(client, "bob", spec(source(env / "shared" / "." / "sub" / "x.npz"))).status_code == 201
    assert submit(client, "root", spec(source(target))).status_code == 201


def test_a_symlink_under_an_allowed_prefix_is_judged_by_where_it_leads(client, env):
    """/srv/shared/link -> the storage's datasets folder: bob reaching alice's private dataset through it is refused
    with the very text of any path outside the prefixes; a link to her shared dataset, or within the prefix, is not."""
    push(env, "alice-private", "alice")
    (env / "shared" / "link").symlink_to(env / "storage" / "datasets")
    (env / "shared" / "elsewhere").symlink_to(env / "alice")
    (env / "alice" / "faces.npz").write_bytes(b"alice's data")
    (env / "shared" / "real").mkdir()
    write_npz(env / "shared" / "real" / "x.npz")
    (env / "shared" / "inside").symlink_to(env / "shared" / "real")
    private = env / "shared" / "link" / "alice-private" / "files" / "alice-private.npz"
    for source in (str(private), private.as_uri(), str(env / "shared" / "elsewhere" / "faces.npz")):
        text = refused(attempt(client, "bob", spec(source)))
        prefixes = ((env / "shared").as_uri() + "/", PUBLIC_S3)
        assert text == f"data.source: {not_readable_message(source, prefixes)}"
    assert submit(client, "alice", spec(str(private))).status_code == 201  # her own dataset, by any path
    assert submit(client, "bob", spec(str(env / "shared" / "inside" / "x.npz"))).status_code == 201
    Storage.from_settings().share("alice-private", owner="alice")
    assert attempt(client, "bob", spec(str(private))).status_code == 201  # shared: readable by everyone


def test_s3_urls_outside_the_allowed_prefixes_are_refused(client):
    for source in (
        "s3://other-bucket/secret.npz",
        "s3://public-bucket/private/x.npz",
        "s3://public-bucket/publicity/x.npz",
        "s3://public-bucket/public/../private/x.npz",
        "s3://public-bucket/./public/x.npz",
        "s3://public-bucket/public",
        "S3://public-bucket/public/x",
    ):
        refused(attempt(client, "bob", spec(source)))
    for source in ("s3://public-bucket/public/x.npz", "s3://public-bucket/public/folder/"):
        assert submit(client, "bob", spec(source)).status_code == 201
    assert submit(client, "root", spec("s3://other-bucket/secret.npz")).status_code == 201
    assert submit(client, "bob", spec("builtin:dsprites")).status_code == 201


def test_prefix_matching_by_itself():
    bob = Principal("bob", "user", "bob-token-4567")
    allowed = ("file:///data/shared", "s3://b/p/")
    for source in (
        "/data/shared",
        "/data/shared/x",
        "file:///data/shared/a/./b",
        "//data/shared/x",
        "s3://b/p/k",
        "builtin:anything",
    ):
        assert check_data_source(source, bob, allowed) is None, source
    for source in (
        "/data/sharedx",
        "/data/shared/../x",
        "data/shared/x",
        "~/x",
        "file://data/shared/x",
        "s3://b/p",
        "s3://b/p//k",
        "s3://b/q/k",
        "s3:///p/k",
        "",
        "/data/shared/\x00",
        "file:///data/shared/%2E%2E/x",
    ):
        assert check_data_source(source, bob, allowed) is not None, source
    assert check_data_source("/data/shared/x", bob, ()) is not None  # no prefixes set: no paths at all


def test_storage_that_does_not_answer_is_a_503_not_a_pass(client, env, monkeypatch):
    push(env, "alice-faces", "alice")

    def down(self, name):
        raise StorageUnreachable("endpoint down")

    monkeypatch.setattr(Storage, "manifest", down)
    response = attempt(client, "bob", spec("alice-faces"))
    assert response.status_code == 503 and "submit again later" in response.json()["detail"]


def test_the_allowed_prefixes_setting(tmp_path):
    loaded = ServiceSettings.load(
        {"AEFORGE_HOME": str(tmp_path), "AEFORGE_ALLOWED_DATA_PREFIXES": "file:///data/shared/, s3://bucket/public/"}
    )
    assert loaded.allowed_data_prefixes == ("file:///data/shared/", "s3://bucket/public/")
    assert ServiceSettings.load({"AEFORGE_HOME": str(tmp_path)}).allowed_data_prefixes == ()
    for bad in ("/data/shared", "file://relative/x", "s3:///nobucket", "http://x/"):
        with pytest.raises(SettingsError, match="AEFORGE_ALLOWED_DATA_PREFIXES"):
            ServiceSettings.load({"AEFORGE_HOME": str(tmp_path), "AEFORGE_ALLOWED_DATA_PREFIXES": bad})


# --- model names ----------------------------------------------------------------------------------------------------


def test_another_users_model_name_is_refused_at_submit(client, mlflow_sqlite):
    mlflow_client = mlflow.MlflowClient(mlflow_sqlite)
    mlflow_client.create_registered_model("alice-model", tags={access.OWNER_TAG: "alice"})
    mlflow_client.create_registered_model("legacy-model")  # from before owners: the job claims it
    detail = refused(attempt(client, "bob", spec(model_name="alice-model")), 409, "register.model_name")
    assert "'alice-model'" in detail and "belongs to alice" in detail
    refused(attempt(client, "bob", spec(model_name="alice-model", kind="sweep")), 409, "register.model_name")
    refused(attempt(client, "root", spec(model_name="alice-model")), 409, "register.model_name")  # admins too
    assert submit(client, "alice", spec(model_name="alice-model")).status_code == 201
    assert submit(client, "bob", spec(model_name="bob-model")).status_code == 201
    assert submit(client, "bob", spec(model_name="legacy-model")).status_code == 201


def test_a_new_model_name_is_reserved_at_submit_so_a_second_owner_cannot_race_for_it(client, mlflow_sqlite):
    assert submit(client, "bob", spec(model_name="fresh-model")).status_code == 201
    assert registered_model_owner("fresh-model", mlflow_sqlite) == "bob"  # reserved before anything trained
    detail = refused(attempt(client, "alice", spec(model_name="fresh-model")), 409, "register.model_name")
    assert "belongs to bob" in detail
    assert submit(client, "bob", spec(model_name="fresh-model")).status_code == 201  # his own, again


def test_mlflow_out_of_reach_lets_the_job_through(client, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    started = time.monotonic()
    assert submit(client, "bob", spec(model_name="anything")).status_code == 201
    assert time.monotonic() - started < 10


def test_a_missing_sqlite_store_is_not_created(tmp_path):
    db = tmp_path / "mlflow.db"
    assert registered_model_owner("x", f"sqlite:///{db}") is None and not db.exists()


def test_the_owner_is_read_from_an_mlflow_server(mlflow_server):
    mlflow_client = mlflow.MlflowClient(str(mlflow_server))
    mlflow_client.create_registered_model("served-alice-model", tags={access.OWNER_TAG: "alice"})
    mlflow_client.create_registered_model("served-untagged-model")
    assert registered_model_owner("served-alice-model", str(mlflow_server)) == "alice"
    assert registered_model_owner("served-untagged-model", str(mlflow_server)) is None
    assert registered_model_owner("served-no-such-model", str(mlflow_server)) is None
    bob = Principal("bob", "user", "bob-token-4567")
    assert access.check_model_name("served-alice-model", bob, str(mlflow_server)).status == 409
    assert access.check_model_name("served-new-model", bob, str(mlflow_server)) is None  # reserved over REST
    assert registered_model_owner("served-new-model", str(mlflow_server)) == "bob"
    alice = Principal("alice", "user", "alice-token-123")
    assert access.check_model_name("served-new-model", alice, str(mlflow_server)).status == 409


def test_the_tag_is_the_one_the_registry_writes():
    from jobs.registry import OWNER_TAG

    assert access.OWNER_TAG == OWNER_TAG


# --- who is who -----------------------------------------------------------------------------------------------------


def test_whoami_and_the_job_owner_in_the_jobs_environment(client, env):
    for who, role in (("alice", "user"), ("root", "admin")):
        api = AeforgeClient("http://testserver", TOKENS[who], http=client)
        assert api.whoami() == {"owner": who, "role": role}
    with pytest.raises(ApiError) as info:
        AeforgeClient("http://testserver", "not-a-token", http=client).whoami()
    assert info.value.status == 401
    job_id = submit(client, "bob", spec()).json()["id"]
    store = Store(f"sqlite:///{env / 'api.db'}")
    try:
        environment = job_environment(store.get(job_id), {"AEFORGE_HOME": str(env)})
    finally:
        store.close()
    assert environment["AEFORGE_JOB_OWNER"] == "bob"
