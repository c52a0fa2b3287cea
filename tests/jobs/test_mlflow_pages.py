"""What MLflow's pages show about a job (issue 10, point 5): the experiment's description and tags, a run's dataset
input, source, user and logged model, the registered model's and version's descriptions and tags, and sweep
trials' run names.

The end-to-end test reads everything back the way the UI does, through the tracking server's REST API (plain HTTP
GETs against a real `mlflow server`), after one real tiny Ray run (the module's only fit: ~13 s of Ray Train
start-up on 2 CPUs). The rest are unit tests on a sqlite store or on plain functions.
"""

from __future__ import annotations

import hashlib
import json
import re
import urllib.parse
import urllib.request

import mlflow
import numpy as np
import pytest
import yaml

from jobs.lineage import experiment_description, experiment_tags, source_tags, training_dataset
from jobs.spec import JobSpec, check_data, parse_spec
from jobs.sweep import TRIAL_KEYS, trial_index, trial_run_name
from tests.jobs.test_ray_train import DATASET, env, new_job_id, tiny_spec  # noqa: F401 (env: the module's fixture)
from workers.tracking import NOTE_TAG, ensure_experiment, start_or_resume_run

# --- sweep trial names --------------------------------------------------------------------------------------------


def grid_trials(spec: JobSpec) -> list[tuple[str, dict]]:
    """(trial id, values) as Tune makes them for a grid: one id prefix per experiment, an index counting from 0."""
    return [(f"1a2b3_{i:05d}", values) for i, values in enumerate(spec.trial_configs())]


def sweep_spec(**sweep) -> JobSpec:
    return JobSpec.model_validate(
        {
            "name": "faces-sweep",
            "kind": "sweep",
            "model": {"variant": "beta_vae", "architecture": "mlp", "latent_dim": 2},
            "sweep": {"beta": [1, 4, 16], "latent_dim": [2, 10], **sweep},
        }
    )


def test_trial_run_names_differ_early_and_are_unique_within_the_sweep():
    spec = sweep_spec()
    names = [trial_run_name(spec.name, trial_id, values, spec.num_trials()) for trial_id, values in grid_trials(spec)]
    assert names[:3] == ["faces-sweep-t00-beta1-z2", "faces-sweep-t01-beta1-z10", "faces-sweep-t02-beta4-z2"]
    assert names[-1] == "faces-sweep-t05-beta16-z10"
    assert len(set(names)) == len(names) == 6
    # What the UI's cut-off names show: the trial index right after the spec's name, unlike the job id it had.
    prefix = len(spec.name) + len("-t00")
    assert len({name[:prefix] for name in names}) == len(names)


def test_trial_run_names_are_the_same_on_a_resume_and_padded_to_the_sweep_size():
    spec = sweep_spec(seed=list(range(20)), variant=["beta_vae", "beta_tcvae"])  # 3 x 2 x 20 x 2 = 240 trials
    trial_id, values = grid_trials(spec)[123]
    name = trial_run_name(spec.name, trial_id, values, spec.num_trials())
    # A restored sweep gives each trial back its id and values, and so its name.
    assert trial_run_name(spec.name, trial_id, dict(values), spec.num_trials()) == name
    assert name.startswith("faces-sweep-t123-")
    assert trial_run_name(spec.name, "1a2b3_00007", values, spec.num_trials()).startswith("faces-sweep-t007-")
    assert set(values) == set(TRIAL_KEYS)
    assert (
        name
        == f"faces-sweep-t123-{values['variant']}-beta{values['beta']:g}-z{values['latent_dim']}-seed{values['seed']}"
    )
    # Random beta draws are shortened; the index keeps two draws that round alike apart.
    assert trial_run_name("s", "1a2b3_00001", {"beta": 3.14159265}, 10) == "s-t01-beta3.14"
    assert trial_index("1a2b3_00042") == 42 and trial_index("?") is None
    assert trial_run_name("s", "?", {"latent_dim": 3}, 4) == "s-?-z3"


# --- experiment description and tags -----------------------------------------------------------------------------


def test_the_experiment_gets_a_description_and_tags_listing_every_value_its_jobs_had(mlflow_sqlite):
    spec = tiny_spec()
    experiment_id = ensure_experiment(spec.name, description=experiment_description(spec), tags=experiment_tags(spec))
    client = mlflow.MlflowClient(mlflow_sqlite)
    tags = client.get_experiment(experiment_id).tags
    assert tags["aeforge.kind"] == "train" and tags["aeforge.variant"] == "beta_tcvae"
    assert tags["aeforge.dataset"] == DATASET
    # The UI shows the first line until the description is expanded: it says what the runs are.
    assert tags[NOTE_TAG].splitlines()[0] == (
        "**aeforge** runs of `raytest-btcvae`: beta_tcvae (mlp, latent size 3, beta 4) trained on `shapes16`."
    )
    assert tags["mlflow.experimentKind"] == "custom_model_development"

    # A later job of the same name: its values join the lists; a description written in the UI is kept.
    client.set_experiment_tag(experiment_id, NOTE_TAG, "written by hand")
    other = JobSpec.model_validate(
        {
            **spec.model_dump(mode="json", by_alias=True),
            "kind": "sweep",
            "model": {"variant": "vae", "architecture": "mlp", "latent_dim": 3},
            "sweep": {"latent_dim": [2, 3], "variant": ["vae", "ae"]},
        }
    )
    assert (
        ensure_experiment(spec.name, description=experiment_description(other), tags=experiment_tags(other))
        == experiment_id
    )
    tags = client.get_experiment(experiment_id).tags
    assert tags["aeforge.variant"] == "ae, beta_tcvae, vae" and tags["aeforge.kind"] == "sweep, train"
    assert tags[NOTE_TAG] == "written by hand"
    assert experiment_description(other).splitlines()[0] == (
        "**aeforge** runs of `raytest-btcvae`: vae, ae (mlp) on `shapes16`, a grid sweep of 4 trials over "
        "latent_dim 2, 3 × variant vae, ae, ranked by eval/elbo (max)."
    )


def test_a_queue_job_and_a_spec_file_are_the_runs_source(tmp_path, monkeypatch):
    assert source_tags("faces-1", None, "alice") == {
        "mlflow.source.name": "aeforge job faces-1",
        "mlflow.source.type": "JOB",
        "mlflow.user": "alice",
    }
    monkeypatch.chdir(tmp_path)
    assert source_tags("faces-1", "specs/faces.yaml", "bob") == {
        "mlflow.source.name": str(tmp_path / "specs" / "faces.yaml"),
        "mlflow.source.type": "LOCAL",
        "mlflow.user": "bob",
    }


# --- the dataset input ----------------------------------------------------------------------------------------------


def data_spec(source: str, **data) -> JobSpec:
    return JobSpec.model_validate(
        {
            "name": "faces",
            "model": {"variant": "vae", "architecture": "mlp", "latent_dim": 2},
            "data": {"source": source, **data},
            "train": {"steps": 1, "batch_size": 2},
        }
    )


def as_dataset(spec: JobSpec):
    from workers.storage import Storage

    storage = Storage.from_settings()
    return training_dataset(spec, storage, check_data(spec, resolve=storage.resolve))


def test_a_local_file_a_pushed_dataset_and_a_builtin_as_dataset_inputs(tmp_path, monkeypatch):
    from workers.storage import Storage

    monkeypatch.setenv("AEFORGE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("AEFORGE_STORAGE", raising=False)
    path = tmp_path / "squares.npz"
    rng = np.random.default_rng(0)
    np.savez(path, images=(rng.random((40, 8, 8)) > 0.5).astype(np.uint8) * 255)
    file_sha = hashlib.sha256(path.read_bytes()).hexdigest()

    local = as_dataset(data_spec(str(path)))
    profile = json.loads(local.profile)
    assert (local.name, local.source_type, json.loads(local.source)) == ("squares.npz", "local", {"uri": path.as_uri()})
    assert profile["sha256"] == file_sha and profile["examples"] == 40 and profile["image_shape"] == [1, 8, 8]
    assert profile["bytes"] == path.stat().st_size and profile["has_factors"] is False
    schema = json.loads(local.schema)["mlflow_tensorspec"]["features"]
    assert json.loads(schema)[0]["tensor-spec"] == {"dtype": "float32", "shape": [-1, 1, 8, 8]}
    assert len(local.digest) == 16
    limited = as_dataset(data_spec(str(path), limit=20))
    assert limited.digest != local.digest and json.loads(limited.profile)["examples"] == 20  # what the run saw

    Storage.from_settings().push([path], "squares")
    pushed = as_dataset(data_spec("squares"))
    profile = json.loads(pushed.profile)
    storage_uri = (tmp_path / "home" / "storage" / "datasets" / "squares").as_uri()
    assert (pushed.name, pushed.source_type, json.loads(pushed.source)) == ("squares", "local", {"uri": storage_uri})
    assert profile["files"] == 1 and profile["format"] == "npz" and "manifest" in profile["digest_of"]
    # Pushing the same bytes again changes nothing about the data: the digest stays.
    Storage.from_settings().push([path], "squares", overwrite=True)
    assert as_dataset(data_spec("squares")).digest == pushed.digest

    builtin = as_dataset(data_spec("builtin:dsprites", limit=100))
    profile = json.loads(builtin.profile)
    assert (builtin.name, builtin.source_type) == ("dsprites", "code")
    assert json.loads(builtin.source) == {
        "tags": {"aeforge.builtin": "dsprites", "generator": "workers.data.dsprites.load_dsprites"}
    }
    assert profile["examples"] == 100 and profile["examples_in_source"] == 737_280 and profile["has_factors"] is True
    assert as_dataset(data_spec("builtin:dsprites", limit=100)).digest == builtin.digest  # generated alike


# --- one real run, read back through the REST API -------------------------------------------------------------------


def rest(server: str, endpoint: str, **query) -> dict:
    """GET /api/2.0/mlflow/<endpoint>?<query> on the tracking server, as JSON (what the UI reads)."""
    url = f"{server}/api/2.0/mlflow/{endpoint}?{urllib.parse.urlencode(query)}"
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def tags_of(entity: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in entity.get("tags", [])}


@pytest.fixture(scope="module")
def paged_run(env, tmp_path_factory):
    """One tiny train job run from a spec file, as `aeforge run FILE` runs it."""
    from jobs.run import run_train_on_ray

    spec = tiny_spec(model_name="pages-btcvae", alias="candidate", description="the pages test's model")
    # One worker: the pages show nothing of a second one, which would only add its process's start-up.
    spec = spec.model_copy(update={"resources": spec.resources.model_copy(update={"workers": 1})})
    spec_file = tmp_path_factory.mktemp("specs") / "pages.yaml"
    spec_file.write_text(yaml.safe_dump(spec.model_dump(mode="json", by_alias=True)))
    job_id = new_job_id("pages")
    return spec, job_id, spec_file, run_train_on_ray(parse_spec(spec_file.read_text()), job_id, spec_file=spec_file)


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_the_pages_of_a_real_run_through_the_rest_api(paged_run, env):
    spec, job_id, spec_file, outcome = paged_run
    server = str(env["mlflow"])
    run = rest(server, "runs/get", run_id=outcome["mlflow_run_id"])["run"]

    # The experiment: description and tags.
    experiment = rest(server, "experiments/get", experiment_id=run["info"]["experiment_id"])["experiment"]
    assert experiment["name"] == spec.name
    experiment_tags_ = tags_of(experiment)
    assert experiment_tags_[NOTE_TAG].startswith(f"**aeforge** runs of `{spec.name}`: beta_tcvae (mlp, latent size 3")
    assert experiment_tags_["aeforge.variant"] == "beta_tcvae" and experiment_tags_["aeforge.dataset"] == DATASET
    assert experiment_tags_["aeforge.kind"] == "train"

    # The run: its source (the spec file), user, description, and the data set as an input.
    run_tags = tags_of(run["data"])
    assert run["info"]["run_name"] == job_id
    assert run_tags["mlflow.source.name"] == str(spec_file) and run_tags["mlflow.source.type"] == "LOCAL"
    assert run_tags["mlflow.user"]
    assert run_tags[NOTE_TAG].startswith(f"Job `{job_id}` of the spec `{spec.name}`: beta_tcvae (mlp, latent size 3")
    [dataset_input] = run["inputs"]["dataset_inputs"]
    assert tags_of(dataset_input) == {"mlflow.data.context": "train"}
    dataset = dataset_input["dataset"]
    assert dataset["name"] == DATASET and dataset["source_type"] == "s3" and len(dataset["digest"]) == 16
    assert json.loads(dataset["source"]) == {"uri": f"s3://{env['bucket']}/{env['prefix']}/datasets/{DATASET}"}
    profile = json.loads(dataset["profile"])
    assert profile["examples"] == 256 and profile["image_shape"] == [1, 16, 16] and profile["has_factors"] is True
    assert profile["files"] == 1 and "manifest" in profile["digest_of"]

    # The logged model: an output of the run, with the run's final metrics.
    [model_output] = run["outputs"]["model_outputs"]
    logged = rest(server, f"logged-models/{model_output['model_id']}")["model"]
    assert logged["info"]["source_run_id"] == outcome["mlflow_run_id"]
    assert {m["key"] for m in logged["data"]["metrics"]} >= {"eval/elbo", "eval/mig"}

    # The registered model and the version: descriptions and tags.
    registered = rest(server, "registered-models/get", name="pages-btcvae")["registered_model"]
    assert registered["description"].startswith("the pages test's model\n\nAutoencoders trained by **aeforge**")
    model_tags = tags_of(registered)
    assert (model_tags["variant"], model_tags["latent_dim"], model_tags["dataset"], model_tags["job_id"]) == (
        "beta_tcvae",
        "3",
        DATASET,
        job_id,
    )
    version = rest(server, "model-versions/get", name="pages-btcvae", version=outcome["model"]["version"])[
        "model_version"
    ]
    assert version["run_id"] == outcome["mlflow_run_id"] and version["source"] == f"models:/{model_output['model_id']}"
    description = version["description"]
    assert description.startswith(
        "the pages test's model\n\nbeta_tcvae (mlp, latent_dim=3, beta=4) trained on shapes16"
    )
    assert f"| eval/mig | {outcome['metrics']['eval/mig']:.6g} |" in description.splitlines()
    version_tags = tags_of(version)
    assert version_tags["job_id"] == job_id and float(version_tags["metric.eval/mig"]) == outcome["metrics"]["eval/mig"]

    # The version page shows the run's pictures: each picture link in the description is served by the server.
    links = re.findall(r"\((get-artifact\?[^)]+)\)", description)
    shown = [line[2 : line.index("]")] for line in description.splitlines() if line.startswith("![")]
    assert shown == ["reconstructions", "traversal", "samples"]
    assert {link.split("&")[0].rsplit("%2F", 1)[1] for link in links} >= {"reconstructions.png", "loss_curves.png"}
    for link in links:
        with urllib.request.urlopen(f"{server}/{link}", timeout=30) as response:
            assert response.read(8) == b"\x89PNG\r\n\x1a\n", link
    assert f"/runs/{outcome['mlflow_run_id']}/artifacts/pictures)" in description


def test_running_the_job_again_adds_no_second_dataset_input(mlflow_sqlite, tmp_path):
    """A resumed job logs its inputs again: MLflow keeps one per dataset."""
    from workers.tracking import MlflowRun

    path = tmp_path / "squares.npz"
    np.savez(path, images=np.zeros((8, 8, 8), dtype=np.uint8))
    spec = data_spec(str(path))
    run = MlflowRun(start_or_resume_run(ensure_experiment(spec.name), "job-1"))
    for _ in range(2):
        run.log_dataset(as_dataset(spec))
    inputs = mlflow.MlflowClient(mlflow_sqlite).get_run(run.run_id).inputs.dataset_inputs
    assert [i.dataset.name for i in inputs] == ["squares.npz"]
