"""jobs.registry: log, register, tag, describe and load autoencoders; against sqlite and the real mlflow server
with S3 artifacts."""

from __future__ import annotations

import mlflow
import mlflow.pytorch
import pytest
import torch
from torch import nn

from jobs.registry import ModelLookupError, describe, list_models, load_model, log_and_register, parse_ref
from jobs.spec import JobSpec
from workers.config import ModelConfig
from workers.models.base import Autoencoder
from workers.tracking import MlflowRun, ensure_experiment, start_or_resume_run, use_tracking_uri

IMAGE_SHAPE = (1, 8, 8)


class TinyAutoencoder(Autoencoder):
    """Linear encoder and decoder: the registry needs the Autoencoder interface, not a real architecture."""

    variant = "ae"

    def __init__(self, config: ModelConfig, image_shape, dataset_size: int = 100):
        nn.Module.__init__(self)
        self.config = config
        self.image_shape = tuple(image_shape)
        self.latent_dim = config.latent_dim
        self.dataset_size = dataset_size
        pixels = int(torch.tensor(image_shape).prod())
        encoder_out = 2 * config.latent_dim if self.stochastic else config.latent_dim
        self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(pixels, encoder_out))
        self.decoder = nn.Sequential(nn.Linear(config.latent_dim, pixels), nn.Unflatten(1, self.image_shape))


class TinyBetaVAE(TinyAutoencoder):
    variant = "beta_vae"
    stochastic = True


def make_spec(
    variant: str = "beta_vae", name: str = "tiny-faces", alias: str = "candidate", description: str | None = None
) -> JobSpec:
    model = {"variant": variant, "architecture": "mlp", "latent_dim": 3}
    if variant in ("beta_vae", "beta_tcvae"):
        model["beta"] = 4.0
    register = {"model_name": name, "alias": alias}
    if description is not None:
        register["description"] = description
    return JobSpec.model_validate(
        {
            "name": name,
            "model": model,
            "data": {"source": "file:///data/faces.npz"},
            "train": {"steps": 10},
            "register": register,
        }
    )


def make_model(spec: JobSpec) -> Autoencoder:
    torch.manual_seed(0)
    cls = TinyBetaVAE if spec.model.stochastic else TinyAutoencoder
    return cls(spec.model, IMAGE_SHAPE)


METRICS = {"eval/elbo": -41.5, "eval/recon": 38.25, "eval/mig": 0.125, "train/loss": 40.0}


def register_one(spec: JobSpec, job_id: str = "job-1", **kwargs):
    experiment_id = ensure_experiment(spec.name)
    run_id = start_or_resume_run(experiment_id, job_id)
    model = make_model(spec)
    return model, run_id, log_and_register(model, spec, job_id, run_id, METRICS, **kwargs)


def test_parse_ref_forms():
    assert parse_ref("faces@best") == ("faces", "alias", "best")
    assert parse_ref("models:/faces@best") == ("faces", "alias", "best")
    assert parse_ref("faces/3") == ("faces", "version", "3")
    assert parse_ref("faces") == ("faces", None, None)
    assert parse_ref("faces/latest") == ("faces", None, None)
    with pytest.raises(ModelLookupError, match="must be a number"):
        parse_ref("faces/three")
    with pytest.raises(ModelLookupError, match="no alias"):
        parse_ref("faces@")


def test_register_tags_describe_and_load(mlflow_sqlite, tmp_path):
    spec = make_spec()
    model, run_id, registered = register_one(spec)
    assert registered["name"] == "tiny-faces" and registered["version"] == "1" and registered["alias"] == "candidate"
    assert registered["model_uri"] == "models:/tiny-faces/1"

    client = mlflow.MlflowClient(mlflow_sqlite)
    version = client.get_model_version_by_alias("tiny-faces", "candidate")
    assert str(version.version) == "1" and version.run_id == run_id
    assert version.tags["variant"] == "beta_vae"
    assert version.tags["beta"] == "4.0"
    assert version.tags["latent_dim"] == "3"
    assert version.tags["architecture"] == "mlp"
    assert version.tags["dataset"] == "file:///data/faces.npz"
    assert version.tags["job_id"] == "job-1"
    assert float(version.tags["metric.eval/elbo"]) == -41.5
    assert version.description.startswith(
        "beta_vae (mlp, latent_dim=3, beta=4) trained on file:///data/faces.npz by job job-1"
    )
    assert "eval/elbo=-41.5" in version.description and "eval/mig=0.125" in version.description

    x = torch.rand(5, *IMAGE_SHAPE, generator=torch.Generator().manual_seed(1))
    for ref in ("tiny-faces@candidate", "tiny-faces/1", "tiny-faces", "models:/tiny-faces@candidate"):
        loaded = load_model(ref)
        assert isinstance(loaded, TinyBetaVAE) and not loaded.training
        torch.testing.assert_close(loaded(x), model(x))
    assert loaded.encode(x).mean.shape == (5, 3)
    assert loaded.sample(4, generator=torch.Generator().manual_seed(0)).shape == (4, *IMAGE_SHAPE)

    # The run's pictures show up in describe(); metric tags come back as numbers.
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    (pictures / "samples.png").write_bytes(b"png")
    MlflowRun(run_id).log_artifacts(pictures, "pictures")
    info = describe("tiny-faces@candidate")
    assert info["version"] == "1" and info["aliases"] == ["candidate"] and info["run_id"] == run_id
    assert info["metrics"] == METRICS
    assert info["tags"]["variant"] == "beta_vae" and not any(k.startswith("metric.") for k in info["tags"])
    assert [p.rsplit("/", 2)[-2:] for p in info["pictures"]] == [["pictures", "samples.png"]]


def test_the_model_and_version_pages_say_what_the_model_is(mlflow_sqlite, tmp_path):
    """The registered model gets a description and tags naming its latest version; the version's description holds
    the final metrics as a table and shows the run's pictures; the logged model is an output of the run, carrying
    the metrics of the final evaluation step."""
    from jobs.registry import OWNER_TAG

    spec = make_spec(name="paged-faces")
    experiment_id = ensure_experiment(spec.name)
    run_id = start_or_resume_run(experiment_id, "paged-1")
    run = MlflowRun(run_id)
    run.log_metrics({"train/loss": 44.0}, 10)
    run.log_metrics({"eval/elbo": -41.5, "eval/mig": 0.125, "train/loss": 40.0}, 20)
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    for name in ("samples.png", "traversal.png", "loss_curves.png"):
        (pictures / name).write_bytes(b"png")
    run.log_artifacts(pictures, "pictures")
    registered = log_and_register(make_model(spec), spec, "paged-1", run_id, run.final_metrics())

    client = mlflow.MlflowClient(mlflow_sqlite)
    model = client.get_registered_model("paged-faces")
    assert "Autoencoders trained by **aeforge** from the spec `paged-faces`" in model.description
    assert "beta_vae (mlp, latent size 3, beta 4)" in model.description
    assert {k: model.tags[k] for k in ("variant", "latent_dim", "beta", "dataset", "job_id", OWNER_TAG)} == {
        "variant": "beta_vae",
        "latent_dim": "3",
        "beta": "4.0",
        "dataset": "file:///data/faces.npz",
        "job_id": "paged-1",
        OWNER_TAG: model.tags[OWNER_TAG],
    }

    version = client.get_model_version("paged-faces", registered["version"])
    lines = version.description.splitlines()
    assert lines[0].startswith("beta_vae (mlp, latent_dim=3, beta=4) trained on file:///data/faces.npz by job paged-1")
    assert "| metric | final value |" in lines
    assert "| eval/elbo | -41.5 |" in lines and "| eval/mig | 0.125 |" in lines and "| train/loss | 40 |" in lines
    # Every picture linked, the traversal and samples shown (in that order), the curves not.
    link = "get-artifact?path=pictures%2F{}.png&run_uuid=" + run_id
    shown = [line for line in lines if line.startswith("![")]
    assert shown == [f"![traversal]({link.format('traversal')})", f"![samples]({link.format('samples')})"]
    [listed] = [line for line in lines if line.startswith("**Pictures** of run")]
    assert f"[{run_id}](#/experiments/{experiment_id}/runs/{run_id}/artifacts/pictures)" in listed
    assert listed.endswith(" · ".join(f"[{n}.png]({link.format(n)})" for n in ("loss_curves", "samples", "traversal")))

    model_id = version.source.removeprefix("models:/")
    outputs = client.get_run(run_id).outputs.model_outputs
    assert [o.model_id for o in outputs] == [model_id] and outputs[0].step == 20
    logged = client.get_logged_model(model_id)
    assert {m.key: m.value for m in logged.metrics} == {"eval/elbo": -41.5, "eval/mig": 0.125, "train/loss": 40.0}

    # A later autoencoder version (no beta) moves the model's tags to it; a description set by hand is kept.
    client.update_registered_model("paged-faces", description="hand-written")
    ae_spec = make_spec(variant="ae", name="paged-faces")
    register_one(ae_spec, "paged-2")
    model = client.get_registered_model("paged-faces")
    assert model.description == "hand-written"
    assert model.tags["variant"] == "ae" and model.tags["job_id"] == "paged-2" and "beta" not in model.tags


def test_a_new_version_takes_the_alias_and_is_the_latest(mlflow_sqlite):
    spec = make_spec(description="first try")
    register_one(spec, "job-1")
    register_one(spec, "job-2", alias="best", extra_tags={"sweep_id": "sw-1"})
    register_one(spec, "job-3")
    client = mlflow.MlflowClient(mlflow_sqlite)
    assert str(client.get_model_version_by_alias("tiny-faces", "candidate").version) == "3"
    best = client.get_model_version_by_alias("tiny-faces", "best")
    assert str(best.version) == "2" and best.tags["sweep_id"] == "sw-1"
    # The spec's description comes first; the generated summary and the final metrics follow it.
    assert best.description.startswith("first try\n\nbeta_vae (mlp, latent_dim=3, beta=4) trained on")
    assert "| eval/mig | 0.125 |" in best.description
    assert describe("tiny-faces")["version"] == "3"
    assert describe("tiny-faces/2")["aliases"] == ["best"]

    [listed] = list_models()
    assert listed["name"] == "tiny-faces" and listed["versions"] == 3 and listed["latest_version"] == "3"
    assert listed["aliases"] == {"best": "2", "candidate": "3"}
    assert listed["latest_tags"]["job_id"] == "job-3"


def test_a_deterministic_autoencoder_registers_without_beta(mlflow_sqlite):
    spec = make_spec(variant="ae", name="tiny-ae")
    model, _, _ = register_one(spec)
    version = mlflow.MlflowClient(mlflow_sqlite).get_model_version("tiny-ae", "1")
    assert version.tags["variant"] == "ae" and "beta" not in version.tags
    loaded = load_model("tiny-ae@candidate")
    with pytest.raises(ValueError, match="no prior"):
        loaded.sample(2)


def test_lookup_errors_say_what_exists(mlflow_sqlite):
    register_one(make_spec())
    with pytest.raises(ModelLookupError, match=r"no registered model named 'nope'.*registered models: tiny-faces"):
        load_model("nope@candidate")
    with pytest.raises(ModelLookupError, match=r"no alias 'prod'; its aliases: candidate \(version 1\)"):
        load_model("tiny-faces@prod")
    with pytest.raises(ModelLookupError, match=r"no version 7; its versions: 1"):
        describe("tiny-faces/7")


def test_bad_registration_input_is_refused_before_logging(mlflow_sqlite):
    spec = make_spec()
    experiment_id = ensure_experiment(spec.name)
    run_id = start_or_resume_run(experiment_id, "job-1")
    with pytest.raises(ValueError, match="register.alias: 'v2' is reserved"):
        log_and_register(make_model(spec), spec, "job-1", run_id, {}, alias="v2")
    no_register = spec.model_copy(update={"registration": None})
    with pytest.raises(ValueError, match="no 'register' section"):
        log_and_register(make_model(spec), no_register, "job-1", run_id, {})
    assert mlflow.MlflowClient(mlflow_sqlite).search_registered_models() == []


def test_register_on_the_server_keeps_artifacts_in_s3(mlflow_server, monkeypatch):
    # Proxied artifacts: this client has no S3 endpoint or keys; only the server does.
    for key in ("MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AEFORGE_S3_ENDPOINT_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", str(mlflow_server))
    spec = make_spec(name="server-faces", alias="staging", description="tiny model for the server test")
    model, run_id, registered = register_one(spec, "server-job-1")

    client = mlflow.MlflowClient(str(mlflow_server))
    version = client.get_model_version_by_alias("server-faces", "staging")
    assert str(version.version) == registered["version"] and version.run_id == run_id
    assert version.description.startswith("tiny model for the server test\n\n")
    assert version.tags["variant"] == "beta_vae" and version.tags["metric.eval/mig"] == "0.125"

    model_id = registered["logged_model_uri"].removeprefix("models:/")
    s3 = mlflow_server.s3_client()
    keys = [
        o["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(
            Bucket=mlflow_server.bucket, Prefix=f"{mlflow_server.prefix}/"
        )
        for o in page.get("Contents", [])
    ]
    model_keys = [k for k in keys if model_id in k]
    assert any(k.endswith("/MLmodel") for k in model_keys), keys
    assert any(k.endswith("/data/model.pth") for k in model_keys), keys

    with use_tracking_uri(str(mlflow_server)):
        loaded = mlflow.pytorch.load_model("models:/server-faces@staging")
    assert isinstance(loaded, TinyBetaVAE)
    loaded.eval()
    x = torch.rand(3, *IMAGE_SHAPE, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(loaded(x), model(x))
    z = loaded.encode(x).mean
    assert z.shape == (3, 3)
    assert loaded.decode(z).shape == (3, *IMAGE_SHAPE)
    assert loaded.sample(6).shape == (6, *IMAGE_SHAPE)


def test_registering_works_when_only_aeforge_knows_the_tracking_uri(mlflow_sqlite, tmp_path, monkeypatch):
    """The embedded default: MLFLOW_TRACKING_URI unset, aeforge's sqlite store under AEFORGE_HOME. MLflow's own
    default store (elsewhere) must not be where the registry looks the logged model up."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.chdir(tmp_path)  # MLflow's default store would be created here
    spec = make_spec(name="embedded-default")
    _, run_id, registered = register_one(spec)
    assert registered["version"] == "1"
    from jobs.registry import registered_version_of_run

    again = registered_version_of_run("embedded-default", run_id, alias="candidate")
    assert again["version"] == "1" and again["alias"] == "candidate"
    assert isinstance(load_model("embedded-default@candidate"), TinyBetaVAE)


def test_the_logged_model_lands_in_the_runs_experiment_under_aeforge_home(tmp_path, monkeypatch):
    """With the embedded default (sqlite under AEFORGE_HOME), registering from a scratch working directory writes
    nothing outside AEFORGE_HOME and the temp folder; the logged model belongs to the job's experiment and run, and
    the model loads from another working directory."""
    from workers.tracking import client

    home = tmp_path / "home"
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setenv("AEFORGE_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(scratch)
    spec = make_spec(name="placed-model")
    _, run_id, registered = register_one(spec, job_id="placed-1")

    assert list(scratch.iterdir()) == []  # no ./mlruns, no stray model files
    outside = [p for p in tmp_path.iterdir() if p not in (home, scratch)]
    assert outside == [], outside
    mlflow_client = client()
    run = mlflow_client.get_run(run_id)
    logged = mlflow_client.get_logged_model(registered["logged_model_uri"].removeprefix("models:/"))
    assert logged.experiment_id == run.info.experiment_id != "0"
    assert logged.source_run_id == run_id
    assert logged.artifact_location.startswith((home / "mlartifacts").as_uri())
    version = mlflow_client.get_model_version("placed-model", registered["version"])
    assert version.run_id == run_id and version.source == f"models:/{logged.model_id}"

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    loaded = load_model("placed-model@candidate")
    assert loaded.encode(torch.rand(2, *IMAGE_SHAPE)).mean.shape == (2, 3)


# --- owners -------------------------------------------------------------------------------------------------------


def registered_state(client, name: str):
    model = client.get_registered_model(name)
    versions = sorted(str(v.version) for v in client.search_model_versions(f"name='{name}'"))
    return versions, {a: str(v) for a, v in (model.aliases or {}).items()}, dict(model.tags or {})


def test_a_model_belongs_to_its_creator_and_another_owner_is_refused_before_logging(mlflow_sqlite, monkeypatch):
    from jobs.registry import OWNER_TAG, RegistrationError

    spec = make_spec(name="owned-faces")
    register_one(spec, "alice-job", owner="alice")
    client = mlflow.MlflowClient(mlflow_sqlite)
    before = registered_state(client, "owned-faces")
    assert before[:2] == (["1"], {"candidate": "1"}) and before[2][OWNER_TAG] == "alice"

    experiment_id = ensure_experiment(spec.name)
    run_id = start_or_resume_run(experiment_id, "bob-job")
    logged_before = len(client.search_logged_models(experiment_ids=[experiment_id]))
    with pytest.raises(RegistrationError, match=r"'owned-faces' belongs to alice; a job of bob cannot"):
        log_and_register(make_model(spec), spec, "bob-job", run_id, METRICS, owner="bob")
    monkeypatch.setenv("AEFORGE_JOB_OWNER", "bob")  # what the queue sets for bob's job
    with pytest.raises(RegistrationError, match="belongs to alice"):
        log_and_register(make_model(spec), spec, "bob-job", run_id, METRICS, alias="best")
    assert registered_state(client, "owned-faces") == before  # no version, no alias moved
    assert len(client.search_logged_models(experiment_ids=[experiment_id])) == logged_before  # nothing logged
    assert client.list_artifacts(run_id) == []

    monkeypatch.setenv("AEFORGE_JOB_OWNER", "alice")
    register_one(spec, "alice-job-2")
    assert registered_state(client, "owned-faces")[:2] == (["1", "2"], {"candidate": "2"})


def test_an_unowned_model_is_claimed_and_a_resumed_job_checks_before_moving_an_alias(mlflow_sqlite, monkeypatch):
    from jobs.registry import OWNER_TAG, RegistrationError, registered_version_of_run

    client = mlflow.MlflowClient(mlflow_sqlite)
    client.create_registered_model("legacy-faces")  # registered before owners were recorded
    spec = make_spec(name="legacy-faces")
    _, run_id, _ = register_one(spec, "carol-job", owner="carol")
    assert registered_state(client, "legacy-faces")[2][OWNER_TAG] == "carol"

    monkeypatch.setenv("AEFORGE_JOB_OWNER", "dave")
    with pytest.raises(RegistrationError, match="'legacy-faces' belongs to carol"):
        registered_version_of_run("legacy-faces", run_id, alias="prod")
    assert "prod" not in registered_state(client, "legacy-faces")[1]
    monkeypatch.setenv("AEFORGE_JOB_OWNER", "carol")
    assert registered_version_of_run("legacy-faces", run_id, alias="prod")["alias"] == "prod"


def test_the_job_owner_is_the_queues_else_the_local_user(monkeypatch):
    import getpass

    from jobs.registry import job_owner

    monkeypatch.setenv("AEFORGE_JOB_OWNER", "alice")
    assert job_owner() == "alice"
    monkeypatch.delenv("AEFORGE_JOB_OWNER")
    assert job_owner() == getpass.getuser()


# --- the gate: aliases move only on purpose (issue 20) ----------------------------------------------------------

GOOD = {**METRICS, "eval/elbo": -88.2, "eval/active_units": 3.0, "eval/kl": 9.0, "eval/collapsed": 0.0}
WEAK = {**GOOD, "eval/elbo": -473.1}
COLLAPSED = {**GOOD, "eval/elbo": -90.0, "eval/active_units": 0.0, "eval/kl": 0.2, "eval/collapsed": 1.0}


def register_with(spec: JobSpec, job_id: str, metrics: dict, **kwargs):
    experiment_id = ensure_experiment(spec.name)
    run_id = start_or_resume_run(experiment_id, job_id)
    return log_and_register(make_model(spec), spec, job_id, run_id, metrics, **kwargs)


def test_a_worse_or_collapsed_version_is_registered_without_the_alias_and_says_why(mlflow_sqlite):
    from jobs.registry import description_decisions

    spec = make_spec(name="gated-faces")
    client = mlflow.MlflowClient(mlflow_sqlite)
    first = register_with(spec, "job-1", GOOD)
    assert (
        first["alias"] == "candidate"
        and first["alias_moved"]
        and first["decision"] == ("@candidate moved to v1 (eval/elbo -88.2)")
    )
    weak = register_with(spec, "job-2", WEAK)
    assert weak["version"] == "2" and weak["alias"] is None and not weak["alias_moved"]
    assert weak["decision"].startswith("@candidate stays on v1: v2's eval/elbo -473.1 is worse than v1's -88.2")
    collapsed = register_with(spec, "job-3", COLLAPSED)
    assert collapsed["decision"].startswith("@candidate stays on v1: v3 is collapsed: 0 active units")
    assert str(client.get_model_version_by_alias("gated-faces", "candidate").version) == "1"
    # Each version's description says what it was compared with and why; `models show` prints that paragraph.
    version = client.get_model_version("gated-faces", "2")
    assert version.tags["alias_decision.candidate"] == weak["decision"]
    assert version.tags["gate_metric"] == "eval/elbo max"
    assert description_decisions(version.description) == [weak["decision"]]
    paragraphs = version.description.split("\n\n")
    assert paragraphs[1].startswith("**Alias:** @candidate stays on v1") and paragraphs[2].startswith("| metric")

    # --force moves it past a better version, never onto a collapsed one.
    forced = register_with(spec, "job-4", WEAK, force=True)
    assert forced["alias"] == "candidate" and "by --force" in forced["decision"]
    assert not register_with(spec, "job-5", COLLAPSED, force=True)["alias_moved"]
    # A spec without an alias registers the record only.
    plain = register_with(spec, "job-6", GOOD, alias=None)
    assert plain["alias"] is None and plain["decision"] == "registered without an alias"
    assert str(client.get_model_version_by_alias("gated-faces", "candidate").version) == "4"


def test_promote_remove_and_compare_go_through_the_gate_as_the_owner(mlflow_sqlite, monkeypatch):
    from jobs.registry import RegistrationError, compare, promote, remove_alias

    monkeypatch.setenv("AEFORGE_JOB_OWNER", "alice")
    spec = make_spec(name="promoted-faces")
    register_with(spec, "job-1", GOOD)
    register_with(spec, "job-2", WEAK)
    register_with(spec, "job-3", COLLAPSED)
    client = mlflow.MlflowClient(mlflow_sqlite)

    refused = promote("promoted-faces", "2", "@candidate")
    assert not refused["moved"] and "worse than v1's -88.2" in refused["decision"]
    assert not promote("promoted-faces", "3", "candidate", force=True)["moved"]  # collapsed: never
    moved = promote("promoted-faces", "2", "@candidate", force=True)
    assert moved["moved"] and str(client.get_model_version_by_alias("promoted-faces", "candidate").version) == "2"
    assert "(by promoted by alice" in client.get_model_version("promoted-faces", "2").description
    assert promote("promoted-faces", "1", "@prod")["moved"]  # a new alias has nothing to be compared with

    monkeypatch.setenv("AEFORGE_JOB_OWNER", "bob")
    with pytest.raises(RegistrationError, match="belongs to alice; bob cannot"):
        promote("promoted-faces", "1", "@candidate")
    with pytest.raises(RegistrationError, match="belongs to alice"):
        remove_alias("promoted-faces", "@prod")
    monkeypatch.setenv("AEFORGE_JOB_OWNER", "alice")
    with pytest.raises(RegistrationError, match="reserved by MLflow"):
        promote("promoted-faces", "1", "@v3")
    with pytest.raises(ModelLookupError, match="no version 9"):
        promote("promoted-faces", "9", "@candidate")
    assert remove_alias("promoted-faces", "@prod") == {"name": "promoted-faces", "alias": "prod", "version": "1"}
    assert "prod" not in client.get_registered_model("promoted-faces").aliases
    with pytest.raises(ModelLookupError, match="no alias 'prod'"):
        remove_alias("promoted-faces", "prod")

    side = compare("promoted-faces", "1", "3")
    rows = {row["metric"]: row for row in side["metrics"]}
    assert rows["eval/elbo"]["values"] == [-88.2, -90.0] and rows["eval/elbo"]["difference"] == pytest.approx(-1.8)
    assert side["health"][0] == "healthy" and side["health"][1].startswith("collapsed: 0 active units")
    assert {row["tag"] for row in side["tags"]} == {"job_id"}
