"""The real product path of `aeforge run` (issue 3), against real components: a local Ray (2 CPUs), moto's S3
server, and a real `mlflow server` whose artifacts are proxied to that S3.

One tiny beta-TCVAE spec (mlp on 16x16 shapes with ground-truth factors, pushed to the bucket as a dataset) is
shared by every test. Each TorchTrainer.fit costs ~13 s of start-up on 2 CPUs, so there are three fits in all:
the end-to-end run (whose job id the re-run test runs again), and the fault-injection run.
"""

from __future__ import annotations

import time
import uuid

import numpy as np
import pytest
from typer.testing import CliRunner

from jobs.spec import JobSpec, SpecError, parse_spec
from tests.fixtures.s3 import TEST_KEYS, point_aeforge_at_s3, s3_client

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

SPEC = """
name: raytest-btcvae
model: {variant: beta_tcvae, architecture: mlp, latent_dim: 3, beta: 4.0, hidden_dims: [64]}
data: {source: shapes16, val_fraction: 0.1}
train:
  steps: 40
  batch_size: 16
  checkpoint_every: 20
  log_every: 10
  seed: 0
  optimizer: {lr: 1.0e-3}
  max_failures: 1
  num_to_keep: 2
eval: {iwae_samples: 2, max_examples: 64, num_train: 100, num_test: 50}
resources: {workers: 2, cpus_per_worker: 1}
register: {model_name: raytest-btcvae, alias: candidate}
"""
STEPS, CHECKPOINT_EVERY, LOG_EVERY = 40, 20, 10
DATASET = "shapes16"


def tiny_spec(**register) -> JobSpec:
    spec = parse_spec(SPEC, "test spec")
    if register:
        spec = JobSpec.model_validate({**spec.model_dump(mode="json", by_alias=True), "register": register})
    return spec


def write_shapes(path) -> None:
    """16x16 binary squares: x position (8) x y position (8) x size (4) = 256 images, one per factor combination."""
    xs, ys, sizes = np.meshgrid(np.arange(8), np.arange(8), np.arange(4), indexing="ij")
    factors = np.stack([xs.ravel(), ys.ravel(), sizes.ravel()], axis=1)
    images = np.zeros((len(factors), 16, 16), dtype=np.uint8)
    for i, (x, y, s) in enumerate(factors):
        side = 2 + s
        images[i, y + 1 : y + 1 + side, x + 1 : x + 1 + side] = 255
    np.savez(
        path,
        images=images,
        factors=factors,
        factor_names=np.array(["x", "y", "size"]),
        factor_sizes=np.array([8, 8, 4]),
    )


def new_job_id(what: str) -> str:
    return f"raytest-{what}-{uuid.uuid4().hex[:8]}"


def checkpoint_dirs(env, job_id: str) -> dict[str, set[str]]:
    """{checkpoint folder: file names} under the Train run's folder in the bucket, listed with boto3."""
    prefix = f"{env['prefix']}/ray/{job_id}/"
    found: dict[str, set[str]] = {}
    for page in env["s3"].get_paginator("list_objects_v2").paginate(Bucket=env["bucket"], Prefix=prefix):
        for obj in page.get("Contents", []):
            rel = obj["Key"][len(prefix) :]
            if rel.startswith("checkpoint_step_") and "/" in rel:
                folder, _, name = rel.partition("/")
                found.setdefault(folder, set())
                if name:  # not the folder's own marker object
                    found[folder].add(name)
    return found


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


@pytest.fixture(scope="module")
def env(ray_cluster, s3_server, mlflow_server, tmp_path_factory):
    """aeforge's settings for the module: storage in a fresh bucket on moto, the real mlflow server, the dataset
    pushed to the bucket with the storage API (no local copy is named by the spec)."""
    from workers.storage import Storage

    bucket = f"aeforge-ray-{uuid.uuid4().hex[:10]}"
    s3 = s3_client(s3_server)
    s3.create_bucket(Bucket=bucket)
    home = tmp_path_factory.mktemp("aeforge-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("RAY_ADDRESS", raising=False)
        point_aeforge_at_s3(mp, s3_server, bucket, home)
        mp.setenv("MLFLOW_TRACKING_URI", str(mlflow_server))
        source = tmp_path_factory.mktemp("data") / "shapes16.npz"
        write_shapes(source)
        Storage.from_settings().push([source], DATASET)
        source.unlink()  # the workers can only get it from the bucket
        yield {
            "bucket": bucket,
            "prefix": "aeforge",
            "s3": s3,
            "home": home,
            "endpoint": s3_server,
            "mlflow": mlflow_server,
        }


@pytest.fixture(scope="module")
def e2e_run(env):
    """The end-to-end job, run once; the re-run test runs its job id again."""
    from jobs.run import run_train_on_ray

    spec = tiny_spec()
    job_id = new_job_id("e2e")
    started = time.perf_counter()
    outcome = run_train_on_ray(spec, job_id)
    seconds = time.perf_counter() - started
    print(f"e2e fit: {outcome['fit_seconds']:.1f} s, run_train_on_ray: {seconds:.1f} s")
    return spec, job_id, outcome


# --- preflight: no Ray, no MLflow run ----------------------------------------------------------------------


@pytest.mark.parametrize("what", ["missing bucket", "missing dataset"])
def test_preflight_fails_in_seconds_before_ray_starts(what, s3_server, s3_bucket, tmp_path, monkeypatch, mlflow_sqlite):
    import jobs.run
    from workers.tracking import client

    endpoint, bucket = s3_bucket
    if what == "missing bucket":
        bucket = f"no-such-bucket-{uuid.uuid4().hex[:8]}"
    for name, value in TEST_KEYS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AEFORGE_STORAGE", f"s3://{bucket}/aeforge")
    monkeypatch.setenv("AEFORGE_S3_ENDPOINT_URL", endpoint)

    def must_not_run(*args, **kwargs):
        raise AssertionError("Ray was started although the preflight should have failed")

    monkeypatch.setattr(jobs.run, "connect_ray", must_not_run)
    monkeypatch.setattr(jobs.run, "build_trainer", must_not_run)

    started = time.perf_counter()
    with pytest.raises((SpecError, ValueError)) as caught:
        jobs.run.run_train_on_ray(tiny_spec(), new_job_id("preflight"))
    elapsed = time.perf_counter() - started
    message = str(caught.value)
    assert elapsed < 10, f"the preflight took {elapsed:.1f} s"
    assert bucket in message and endpoint in message, message
    if what == "missing dataset":
        assert "data.source" in message and f"'{DATASET}'" in message, message
    else:
        assert "does not exist" in message, message
    # Nothing was recorded as if it had run: no MLflow run at all, so none marked FINISHED.
    experiments = client(mlflow_sqlite).search_experiments()
    runs = client(mlflow_sqlite).search_runs([e.experiment_id for e in experiments]) if experiments else []
    assert [r for r in runs if r.info.status == "FINISHED"] == []


def test_aeforge_run_reports_a_missing_bucket_plainly(s3_server, tmp_path, monkeypatch, mlflow_sqlite):
    import jobs.run
    from services.cli import app

    bucket = f"no-such-bucket-{uuid.uuid4().hex[:8]}"
    for name, value in TEST_KEYS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AEFORGE_STORAGE", f"s3://{bucket}/aeforge")
    monkeypatch.setenv("AEFORGE_S3_ENDPOINT_URL", s3_server)
    monkeypatch.setattr(jobs.run, "connect_ray", lambda: pytest.fail("Ray was started"))
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(SPEC)
    started = time.perf_counter()
    result = CliRunner().invoke(app, ["run", str(spec_path)], env={"COLUMNS": "400"})
    assert time.perf_counter() - started < 10
    assert result.exit_code == 2, result.output
    assert f"bucket '{bucket}' does not exist at S3 endpoint {s3_server}" in " ".join(result.output.split())
    assert "Traceback" not in result.output


# --- the product path ------------------------------------------------------------------------------------------


def test_end_to_end_two_worker_run_on_s3_and_the_mlflow_server(env, e2e_run, tmp_path):
    import mlflow.pytorch
    import torch

    from services.cli import app
    from workers.tracking import client, use_tracking_uri

    spec, job_id, outcome = e2e_run
    assert outcome["steps"] == STEPS and outcome["resumed_from_step"] == 0
    # Where the fit's time went, from the chief's timeline and the driver's clock: every part, in order, adding up
    # to the fit's wall time.
    timeline = outcome["timeline"]
    assert list(timeline) == [
        "ray start-up",
        "mlflow client",
        "data",
        "model",
        "first step",
        "steps",
        "evaluation",
        "code statistics",
        "final checkpoint",
        "pictures",
        "outputs",
        "ray tail",
    ]
    assert all(seconds >= 0 for seconds in timeline.values())
    assert sum(timeline.values()) == pytest.approx(outcome["fit_seconds"], abs=0.05)

    # Ray Train checkpoints went to the bucket, one folder per checkpoint, each with the model file.
    folders = checkpoint_dirs(env, job_id)
    assert folders == {"checkpoint_step_000000020": {"checkpoint.pt"}, "checkpoint_step_000000040": {"checkpoint.pt"}}
    assert outcome["checkpoint"].endswith(f"/ray/{job_id}/checkpoint_step_000000040")
    # The workers got the data from the bucket (the spec names a pushed dataset; no local file exists).
    assert list((env["home"] / "cache" / "datasets" / DATASET).glob("*/shapes16.npz"))

    # MLflow: the run, its params, curves from rank 0, evaluation metrics and pictures.
    mlflow_client = client(env["mlflow"])
    run = mlflow_client.get_run(outcome["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["aeforge.job_id"] == job_id
    assert run.data.params["model.beta"] == "4.0" and run.data.params["resources.workers"] == "2"
    assert [s for s, _ in history(mlflow_client, run.info.run_id, "train/loss")] == [10, 20, 30, 40]
    for key in (
        "train/tc",
        "train/mi",
        "train/dwkl",
        "eval/elbo",
        "eval/iwae_ll",
        "eval/tc",
        "eval/mig",
        "eval/dci_disentanglement",
        "eval/factor_vae",
        "perf/images_per_second",
    ):
        assert key in run.data.metrics, (key, sorted(run.data.metrics))
    assert run.data.metrics["perf/images_per_second"] > 0
    pictures = [f.path for f in mlflow_client.list_artifacts(run.info.run_id, "pictures")]
    assert pictures and all(p.endswith(".png") for p in pictures), pictures
    # Proxied artifacts: the client talks to the server only; the bytes are in the server's bucket.
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    server = env["mlflow"]
    keys = [
        o["Key"]
        for page in server.s3_client()
        .get_paginator("list_objects_v2")
        .paginate(Bucket=server.bucket, Prefix=f"{server.prefix}/")
        for o in page.get("Contents", [])
    ]
    assert any(k.endswith(pictures[0].rsplit("/", 1)[-1]) for k in keys)
    assert any(k.endswith("/MLmodel") for k in keys) and any(k.endswith("/model.pth") or "/data/" in k for k in keys)

    # The registry: a version under the spec's name, with the spec's alias, tags and a description.
    model = outcome["model"]
    assert model["name"] == "raytest-btcvae" and model["alias"] == "candidate"
    version = mlflow_client.get_model_version_by_alias("raytest-btcvae", "candidate")
    assert str(version.version) == model["version"] and version.run_id == run.info.run_id
    expected = {
        "variant": "beta_tcvae",
        "beta": "4.0",
        "latent_dim": "3",
        "dataset": DATASET,
        "architecture": "mlp",
        "job_id": job_id,
    }
    assert {k: version.tags.get(k) for k in expected} == expected
    assert "beta_tcvae" in version.description and job_id in version.description
    assert "metric.eval/elbo" in version.tags

    # Loaded back through the registry: `aeforge models sample` writes a PNG ...
    out = tmp_path / "x.png"
    result = CliRunner().invoke(app, ["models", "sample", "raytest-btcvae@candidate", "-n", "16", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # ... and mlflow.pytorch.load_model gives an autoencoder that encodes and decodes.
    with use_tracking_uri(env["mlflow"]):
        loaded = mlflow.pytorch.load_model("models:/raytest-btcvae@candidate", map_location="cpu")
    x = torch.rand(4, 1, 16, 16)
    with torch.no_grad():
        posterior = loaded.encode(x)
        assert posterior.mean.shape == (4, 3) and posterior.logvar.shape == (4, 3)
        decoded = loaded.decode(posterior.mean)
    assert decoded.shape == (4, 1, 16, 16) and float(decoded.min()) >= 0.0 and float(decoded.max()) <= 1.0


def test_running_a_finished_job_id_again_resumes_and_does_not_retrain(env, e2e_run):
    from jobs.run import run_train_on_ray
    from workers.tracking import client

    spec, job_id, first = e2e_run
    mlflow_client = client(env["mlflow"])
    losses_before = history(mlflow_client, first["mlflow_run_id"], "train/loss")
    versions_before = mlflow_client.search_model_versions("name='raytest-btcvae'")

    again = run_train_on_ray(spec, job_id)
    print(f"re-run fit: {again['fit_seconds']:.1f} s")

    assert again["mlflow_run_id"] == first["mlflow_run_id"]  # the same MLflow run ...
    assert again["resumed_from_step"] == STEPS and again["steps"] == STEPS  # ... from the final checkpoint
    assert history(mlflow_client, first["mlflow_run_id"], "train/loss") == losses_before  # nothing retrained
    assert history(mlflow_client, first["mlflow_run_id"], "resume/from_step") == [(STEPS, float(STEPS))]
    assert set(checkpoint_dirs(env, job_id)) == {"checkpoint_step_000000020", "checkpoint_step_000000040"}
    # The model registered by the first run is the job's model; it is not registered twice.
    assert again["model"]["version"] == first["model"]["version"]
    assert len(mlflow_client.search_model_versions("name='raytest-btcvae'")) == len(versions_before)
    assert mlflow_client.get_run(first["mlflow_run_id"]).info.status == "FINISHED"
    assert again["metrics"]["perf/images_per_second"] == first["metrics"]["perf/images_per_second"]


def test_a_worker_killed_mid_run_resumes_from_the_last_checkpoint(env, tmp_path, monkeypatch):
    """Rank 1 exits abruptly (os._exit) at step 30 of its first attempt; Ray Train restarts the worker group
    (FailureConfig.max_failures = 1), which resumes from the checkpoint of step 20 and ends at step 40."""
    from jobs.run import run_train_on_ray
    from tests.fixtures import worker_exit
    from workers.tracking import client

    marker = tmp_path / "rank1-exited"
    worker_exit.install(monkeypatch, tmp_path / "fault", rank=1, step=30, marker=marker)
    spec = tiny_spec(model_name="raytest-fault", alias="candidate")
    # The resume is under test here, not the evaluation: the ELBO only, no disentanglement scores, no pictures.
    spec = spec.model_copy(
        update={"eval": spec.eval.model_copy(update={"disentanglement": False, "pictures": False, "probe": False})}
    )
    job_id = new_job_id("fault")

    outcome = run_train_on_ray(spec, job_id)
    print(f"fault-injection fit: {outcome['fit_seconds']:.1f} s")

    assert marker.read_text().startswith("rank 1 exited at step 30")  # the worker did die
    assert outcome["steps"] == STEPS and outcome["resumed_from_step"] == CHECKPOINT_EVERY
    assert outcome["checkpoint"].endswith("checkpoint_step_000000040")
    mlflow_client = client(env["mlflow"])
    run_id = outcome["mlflow_run_id"]
    assert history(mlflow_client, run_id, "resume/from_step") == [(CHECKPOINT_EVERY, float(CHECKPOINT_EVERY))]
    steps = [s for s, _ in history(mlflow_client, run_id, "train/loss")]
    assert max(steps) == STEPS and set(steps) == {10, 20, 30, 40}
    assert sorted(steps) == [10, 20, 30, 40]  # step 30, trained again after the resume, is not logged twice
    assert "eval/elbo" in mlflow_client.get_run(run_id).data.metrics
    assert mlflow_client.get_run(run_id).info.status == "FINISHED"
    assert outcome["model"]["name"] == "raytest-fault"
    assert set(checkpoint_dirs(env, job_id)) == {"checkpoint_step_000000020", "checkpoint_step_000000040"}


UNICODE_DESCRIPTION = "🚀 β-TCVAE on shapes: 形状の分離 (disentangling shapes) ✓"
UNICODE_MODEL_DESCRIPTION = "模型说明 🧪 — registered by `aeforge run`"


def test_aeforge_run_trains_and_registers_a_spec_with_emoji_and_cjk_text(env, tmp_path):
    """Free text in any Unicode (the spec's description, the registered model's description) survives the whole
    path: the file, the Ray workers, MLflow params and the registry."""
    from services.cli import app
    from workers.tracking import client

    spec = parse_spec(SPEC, "test spec").model_dump(mode="json", by_alias=True)
    spec["name"] = "raytest-unicode"
    spec["description"] = UNICODE_DESCRIPTION
    spec["train"].update(steps=10, checkpoint_every=10, log_every=10)
    spec["eval"].update(disentanglement=False, pictures=False)  # the text is under test here, not the evaluation
    spec["resources"]["workers"] = 1
    spec["register"] = {"model_name": "raytest-unicode", "description": UNICODE_MODEL_DESCRIPTION}
    import yaml

    path = tmp_path / "unicode.yaml"
    path.write_text(yaml.safe_dump(spec, allow_unicode=True), encoding="utf-8")
    job_id = new_job_id("unicode")
    scratch = tmp_path / "scratch"  # the driver's working directory: nothing may be written there
    scratch.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(scratch)
        result = CliRunner().invoke(app, ["run", str(path), "--job-id", job_id], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    assert list(scratch.iterdir()) == []  # no ./mlruns: the model went to the server's artifact store
    mlflow_client = client(env["mlflow"])
    # The version is the record; 10 steps leave the model collapsed, so the registry's gate keeps @candidate off it.
    version = mlflow_client.get_model_version("raytest-unicode", "1")
    assert version.description.startswith(UNICODE_MODEL_DESCRIPTION + "\n\n")  # then the metrics, pictures
    run = mlflow_client.get_run(version.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["aeforge.job_id"] == job_id
    assert run.data.params["description"] == UNICODE_DESCRIPTION
    assert run.data.params["register.description"] == UNICODE_MODEL_DESCRIPTION
    logged = mlflow_client.get_logged_model(version.source.removeprefix("models:/"))
    assert logged.experiment_id == run.info.experiment_id and logged.source_run_id == run.info.run_id
    assert logged.artifact_location.startswith("mlflow-artifacts:")


def test_aeforge_run_refuses_a_job_the_cluster_can_never_fit_instead_of_waiting(env, tmp_path):
    """An unmodified GPU spec on a CPU-only cluster: the same check as the queue's admission, in seconds, before
    any MLflow run exists."""
    import yaml

    from services.cli import app
    from workers.tracking import client

    spec = parse_spec(SPEC, "test spec").model_dump(mode="json", by_alias=True)
    spec["name"] = f"raytest-gpu-{uuid.uuid4().hex[:6]}"
    spec["resources"] = {"workers": 1, "gpus_per_worker": 1, "cpus_per_worker": 4}
    path = tmp_path / "gpu.yaml"
    path.write_text(yaml.safe_dump(spec))
    started = time.perf_counter()
    result = CliRunner().invoke(app, ["run", str(path)], env={"COLUMNS": "400"})
    assert time.perf_counter() - started < 30
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "resources" in text and "asks for CPU 4, GPU 1" in text and "cluster has CPU 2, GPU 0" in text, text
    assert "Traceback" not in result.output
    assert client(env["mlflow"]).get_experiment_by_name(spec["name"]) is None
