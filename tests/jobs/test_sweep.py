"""Sweeps (issue 4): a 4-trial grid over beta x latent size on a real local Ray (2 CPUs), tracked on a real MLflow
server (S3 artifacts on moto); the results table, the summary pictures, the registered best model; a sweep whose
driver is killed, run again with the same job id; the validation that stops a sweep before anything starts; and
`aeforge sweep results`.

The Ray tests share one sweep (module-scoped): each TorchTrainer.fit costs ~13 s of start-up on 2 CPUs.
"""

from __future__ import annotations

import csv
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import mlflow
import mlflow.pytorch
import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from jobs.spec import JobSpec, SpecError, check_cluster, check_data, parse_spec, trials_that_fit
from workers.plots.sweep import _curves, sweep_summary_pictures

ROOT = Path(__file__).resolve().parents[2]
GRID = {(1.0, 2), (1.0, 3), (4.0, 2), (4.0, 3)}
# The summary of a sweep ranked by eval/mig: MIG is drawn once (no metric_vs_beta repeating mig_vs_beta).
PICTURES = {
    "mig_vs_beta.png",
    "recon_vs_beta.png",
    "mig_heatmap.png",
    "recon_vs_mig.png",
    "traversals.png",
    "mig_chen_vs_beta.png",
    "mig_vs_elbo.png",
}
runner = CliRunner()


# --- data and specs ------------------------------------------------------------------------------------------


def write_factor_npz(path: Path, copies: int = 8) -> Path:
    """16x16 images of a 4x4 square at 4 x 4 positions (factors pos_x, pos_y), each combination ``copies`` times."""
    images, factors = [], []
    for _ in range(copies):
        for fx in range(4):
            for fy in range(4):
                img = np.zeros((16, 16), dtype=np.uint8)
                img[4 * fy : 4 * fy + 4, 4 * fx : 4 * fx + 4] = 255
                images.append(img)
                factors.append((fx, fy))
    np.savez(
        path,
        images=np.stack(images),
        factors=np.array(factors, dtype=np.int64),
        factor_names=np.array(["pos_x", "pos_y"]),
        factor_sizes=np.array([4, 4]),
    )
    return path


def write_plain_npz(path: Path, n: int = 64) -> Path:
    rng = np.random.default_rng(0)
    np.savez(path, images=(rng.random((n, 8, 8)) > 0.5).astype(np.uint8) * 255)
    return path


def spec_dict(data: Path, name: str, **overrides) -> dict:
    spec = {
        "name": name,
        "kind": "sweep",
        "model": {"variant": "beta_vae", "architecture": "mlp", "hidden_dims": [32], "latent_dim": 2},
        "data": {"source": str(data), "val_fraction": 0.25},
        # lr 5e-3: at 1e-3 the 30 steps leave every trial collapsed (eval/kl 0.02-0.06 nats), and a sweep ranks no
        # collapsed trial (issue 20); at 5e-3 each carries 0.3-1 nats per latent.
        "train": {"steps": 30, "batch_size": 16, "log_every": 10, "checkpoint_every": 15, "optimizer": {"lr": 5.0e-3}},
        "eval": {"iwae_samples": 2, "max_examples": 32, "num_train": 64, "num_test": 32},
        "resources": {"workers": 1, "cpus_per_worker": 0.5},
        "sweep": {
            "beta": [1, 4],
            "latent_dim": [2, 3],
            "search": "grid",
            "metric": {"name": "eval/mig", "mode": "max"},
            "max_concurrent_trials": 2,
        },
        "register": {"model_name": name},
    }
    for section, value in overrides.items():
        if isinstance(value, dict) and isinstance(spec.get(section), dict):
            spec[section] = {**spec[section], **value}
        else:
            spec[section] = value
    return spec


def make_spec(data: Path, name: str, **overrides) -> JobSpec:
    return parse_spec(yaml.safe_dump(spec_dict(data, name, **overrides)), "test-sweep.yaml")


def errors_of(fn) -> dict[str, str]:
    with pytest.raises(SpecError) as info:
        fn()
    return {e["loc"]: e["msg"] for e in info.value.errors}


# --- MLflow look-ups -----------------------------------------------------------------------------------------


def parent_and_children(client, job_id: str):
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], filter_string=f"tags.`aeforge.job_id` = '{job_id}'"
    )
    assert len(runs) == 1, [r.info.run_name for r in runs]
    parent = runs[0]
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    return parent, children


def fits_per_trial(client, children) -> dict[str, int]:
    """Train fits per trial (by the trial's job id): the chief logs perf/images_per_second once at the end of every
    fit."""
    return {
        c.data.tags["aeforge.job_id"]: len(client.get_metric_history(c.info.run_id, "perf/images_per_second"))
        for c in children
    }


def start_sweep_driver(spec_text: str, job_id: str, log_path: Path, **extra_env: str) -> subprocess.Popen:
    """A sweep's driver as the queue runs it: `python -m jobs.run JOB_ID` in a process group of its own, joined to
    the test's Ray, with the spec in its environment as the queue stores it; its output goes to ``log_path``."""
    import ray

    env = {
        **os.environ,
        "AEFORGE_JOB_SPEC": json.dumps(parse_spec(spec_text).model_dump(mode="json"), sort_keys=True),
        "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
        "PYTHONPATH": str(ROOT),
        **extra_env,
    }
    with open(log_path, "wb") as log:  # the driver writes through its own copy of the file
        return subprocess.Popen(
            [sys.executable, "-m", "jobs.run", job_id],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


# --- fixtures --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sweep_env(tmp_path_factory, mlflow_server, ray_cluster):
    """AEFORGE_HOME (local storage under it) and MLFLOW_TRACKING_URI (the real server) for the module."""
    home = tmp_path_factory.mktemp("sweep-home")
    names = ("AEFORGE_HOME", "AEFORGE_STORAGE", "MLFLOW_TRACKING_URI", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    saved = {k: os.environ.get(k) for k in names}
    os.environ["AEFORGE_HOME"] = str(home)
    os.environ.pop("AEFORGE_STORAGE", None)
    os.environ["MLFLOW_TRACKING_URI"] = str(mlflow_server)
    # Keys a job passes on to its workers (storage is local here, and the MLflow server holds its own S3 keys):
    # the secret must not land in Tune's experiment files, on storage or in MLflow.
    secret = f"sweep-secret-{uuid.uuid4().hex}"
    os.environ["AWS_ACCESS_KEY_ID"] = "sweep-test-key"
    os.environ["AWS_SECRET_ACCESS_KEY"] = secret
    try:
        yield {
            "home": home,
            "tracking_uri": str(mlflow_server),
            "data": write_factor_npz(home / "squares.npz"),
            "secret": secret,
        }
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def finished_sweep(sweep_env):
    """The 4-trial grid sweep, run once for the module: (spec, job id, outcome, seconds)."""
    from jobs.sweep import run_sweep

    name = f"sweep-grid-{uuid.uuid4().hex[:6]}"
    spec = make_spec(sweep_env["data"], name)
    job_id = f"{name}-job"
    t0 = time.perf_counter()
    outcome = run_sweep(spec, job_id)
    seconds = time.perf_counter() - t0
    print(f"\n4-trial sweep: {seconds:.1f} s")
    return spec, job_id, outcome, seconds


# --- the sweep ----------------------------------------------------------------------------------------------------


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_a_grid_sweep_tracks_every_trial_and_registers_the_best(finished_sweep, sweep_env):
    from jobs.sweep import trial_run_name

    spec, job_id, outcome, seconds = finished_sweep
    client = mlflow.MlflowClient(sweep_env["tracking_uri"])

    # The rows returned: one per trial, with its values and final metrics.
    rows = outcome["trials"]
    assert len(rows) == 4 and all(r["status"] == "finished" for r in rows), rows
    assert {(r["beta"], r["latent_dim"]) for r in rows} == GRID
    for row in rows:
        assert row["step"] == 30
        assert all(isinstance(row.get(m), float) for m in ("eval/mig", "eval/recon", "eval/elbo")), row

    # One parent run, four nested runs with the trial's values as params.
    parent, children = parent_and_children(client, job_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["aeforge.kind"] == "sweep"
    assert len(children) == 4 and all(c.info.status == "FINISHED" for c in children)
    seen = set()
    for child in children:
        params = child.data.params
        beta, latent = float(params["trial.beta"]), int(params["trial.latent_dim"])
        assert (float(params["model.beta"]), int(params["model.latent_dim"])) == (beta, latent)
        assert params["kind"] == "train" and child.data.tags["aeforge.sweep_id"] == job_id
        # Named <spec>-t<index>-<values> for the runs list; the trial's own job id keys its files and MLflow run.
        trial_id = child.data.tags["aeforge.trial_id"]
        assert child.info.run_name == trial_run_name(spec.name, trial_id, {"beta": beta, "latent_dim": latent}, 4)
        assert child.data.tags["aeforge.job_id"] == f"{job_id}-{trial_id}"
        # Each trial's page names its source and its data set, as the sweep's does.
        assert (
            child.data.tags["mlflow.source.type"] == "JOB"
            and child.data.tags["mlflow.source.name"] == f"aeforge job {job_id}"
        )
        assert [i.dataset.name for i in client.get_run(child.info.run_id).inputs.dataset_inputs] == ["squares.npz"]
        assert "eval/mig" in child.data.metrics
        seen.add((beta, latent))
    assert seen == GRID
    assert {r["run_name"] for r in rows} == {c.info.run_name for c in children}
    assert set(fits_per_trial(client, children).values()) == {1}

    # The results table (CSV) and the summary pictures on the parent run.
    artifacts = {f.path for f in client.list_artifacts(parent.info.run_id, "pictures")}
    assert artifacts == {f"pictures/{p}" for p in PICTURES}
    table = Path(client.download_artifacts(parent.info.run_id, "results/results.csv", str(sweep_env["home"])))
    with open(table) as fh:
        table_rows = list(csv.DictReader(fh))
    assert len(table_rows) == 4
    assert {(float(r["beta"]), int(r["latent_dim"])) for r in table_rows} == GRID
    assert all(r["eval/mig"] and r["status"] == "finished" for r in table_rows)

    # The best healthy trial (by eval/mig, max) is registered with alias best, tagged with the sweep id, and loads.
    assert all(r["health"] == "healthy" for r in rows), rows
    best = max(rows, key=lambda r: r["eval/mig"])
    assert outcome["best"]["run_name"] == best["run_name"]
    assert parent.data.tags["aeforge.best_trial"] == best["run_name"]
    version = client.get_model_version_by_alias(spec.registration.model_name, "best")
    assert version.tags["sweep_id"] == job_id and version.tags["trial_id"] == best["trial_id"]
    assert int(version.tags["latent_dim"]) == best["latent_dim"] and float(version.tags["beta"]) == best["beta"]
    assert outcome["model"]["version"] == str(version.version)
    with mlflow_uri(sweep_env["tracking_uri"]):
        model = mlflow.pytorch.load_model(f"models:/{spec.registration.model_name}@best", map_location="cpu")
    assert model.latent_dim == best["latent_dim"] and tuple(model.image_shape) == (1, 16, 16)
    with torch.no_grad():
        out = model(torch.rand(2, 1, 16, 16))
    assert tuple(out.shape) == (2, 1, 16, 16)
    assert seconds < 200, f"the 4-trial sweep took {seconds:.0f} s"

    # The keys the trials were given appear nowhere on storage (Tune's experiment files included) or in MLflow.
    storage_root = sweep_env["home"] / "storage"
    secret = sweep_env["secret"].encode()
    leaked = [
        p
        for p in storage_root.rglob("*")
        if p.is_file() and (secret in p.read_bytes() or secret.hex().encode() in p.read_bytes())
    ]
    assert not leaked
    for run in (parent, *children):
        assert sweep_env["secret"] not in json.dumps({**run.data.params, **run.data.tags})


@pytest.fixture(scope="module")
def finished_sweep_run_again(finished_sweep, sweep_env, tmp_path_factory):
    """The finished grid sweep run again once for the module, as `aeforge run SPEC --job-id ID` runs it (the CLI calls
    run_sweep, which a spy wraps to keep its outcome and its seconds): one Tune restore read by two tests, the one on
    what a re-run trains and the one on what `aeforge run` prints. (the CLI result, the outcome, the re-run's seconds,
    fits per trial and the number of model versions before it)"""
    import jobs.sweep
    from services import cli

    spec, job_id, _, _ = finished_sweep
    client = mlflow.MlflowClient(sweep_env["tracking_uri"])
    _, children = parent_and_children(client, job_id)
    fits_before = fits_per_trial(client, children)
    versions_before = len(client.search_model_versions(f"name = '{spec.registration.model_name}'"))

    calls: list[tuple[dict, float]] = []
    run_sweep = jobs.sweep.run_sweep

    def timed_run_sweep(*args, **kwargs):
        t0 = time.perf_counter()
        outcome = run_sweep(*args, **kwargs)
        calls.append((outcome, time.perf_counter() - t0))
        return outcome

    path = tmp_path_factory.mktemp("run-again") / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(jobs.sweep, "run_sweep", timed_run_sweep)
        result = runner.invoke(cli.app, ["run", str(path), "--job-id", job_id])
    assert result.exit_code == 0, result.output
    assert len(calls) == 1, calls
    again, seconds = calls[0]
    print(f"\nre-run of a finished sweep: {seconds:.1f} s")
    return result, again, seconds, fits_before, versions_before


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_running_a_finished_sweep_again_trains_nothing(finished_sweep, finished_sweep_run_again, sweep_env):
    spec, job_id, first, _ = finished_sweep
    _, again, seconds, fits_before, versions_before = finished_sweep_run_again
    client = mlflow.MlflowClient(sweep_env["tracking_uri"])

    parent, children = parent_and_children(client, job_id)
    assert parent.info.status == "FINISHED"
    assert fits_per_trial(client, children) == fits_before  # no trial trained again, no new nested run
    assert {r["run_name"]: r["eval/mig"] for r in again["trials"]} == {
        r["run_name"]: r["eval/mig"] for r in first["trials"]
    }
    assert again["model"]["version"] == first["model"]["version"]
    assert len(client.search_model_versions(f"name = '{spec.registration.model_name}'")) == versions_before
    assert seconds < 60


@pytest.fixture(scope="module")
def packed_sweep(sweep_env, tmp_path_factory):
    """2 beta x 2 seeds of beta-TCVAE in packs of 2 (pack: auto), each pack a 2-worker DDP run, run once for the
    module, with a fault: rank 1 of the first pack to reach step 20 exits abruptly there (once). Two tests read it:
    the packed sweep's results, and the resume of the pack whose worker died. (spec, job id, outcome, marker)"""
    from jobs.sweep import run_sweep
    from tests.fixtures import worker_exit

    folder = tmp_path_factory.mktemp("packed-fault")
    marker = folder / "rank1-exited"
    name = f"sweep-pack-{uuid.uuid4().hex[:6]}"
    spec = make_spec(
        sweep_env["data"],
        name,
        model={"variant": "beta_tcvae"},
        resources={"workers": 2, "cpus_per_worker": 0.45},
        sweep={"beta": [1, 4], "latent_dim": None, "seed": [0, 1], "pack": "auto"},
    )
    job_id = f"{name}-job"
    t0 = time.perf_counter()
    with pytest.MonkeyPatch.context() as mp:
        worker_exit.install(mp, folder / "fault", rank=1, step=20, marker=marker)
        outcome = run_sweep(spec, job_id)
    print(f"\npacked 4-trial sweep with a worker's exit: {time.perf_counter() - t0:.1f} s")
    return spec, job_id, outcome, marker


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_a_packed_sweep_trains_its_trials_in_packs_each_a_first_class_result(packed_sweep, sweep_env, tmp_path):
    """2 beta x 2 seeds of beta-TCVAE in packs of 2 (issue 12), each pack a 2-worker DDP run with the global-batch
    estimator: two Train runs, four nested MLflow runs with their own curves and metrics, the results table and
    pictures, and the best trial's model registered from its member checkpoint. (One pack's worker died on the way
    and the pack resumed: the next test; the results are the same as without the fault.)"""
    from jobs.sweep import load_sweep

    spec, job_id, outcome, _ = packed_sweep
    name = spec.name
    client = mlflow.MlflowClient(sweep_env["tracking_uri"])

    rows = outcome["trials"]
    assert len(rows) == 4 and all(r["status"] == "finished" for r in rows), rows
    assert {(r["beta"], r["seed"]) for r in rows} == {(1.0, 0), (1.0, 1), (4.0, 0), (4.0, 1)}
    assert all(isinstance(r.get("eval/mig"), float) for r in rows)
    # Two packs: two Train runs on storage, each with its members' ordinary checkpoints.
    train_runs = {p.name for p in (sweep_env["home"] / "storage" / "ray").iterdir() if p.name.startswith(job_id)}
    assert len(train_runs) == 2
    for row in rows:
        assert row["checkpoint_path"].rsplit("/", 1)[-1].startswith("member_")
        assert row["run_name"].startswith(f"{name}-t0")

    parent, children = parent_and_children(client, job_id)
    assert len(children) == 4 and all(c.info.status == "FINISHED" for c in children)
    for child in children:
        history = client.get_metric_history(child.info.run_id, "train/loss")
        assert [m.step for m in history] == [10, 20, 30]
        assert "eval/mig" in child.data.metrics and child.data.params["trial.seed"] in ("0", "1")
        assert {f.path for f in client.list_artifacts(child.info.run_id, "pictures")} >= {"pictures/traversal.png"}
    artifacts = {f.path for f in client.list_artifacts(parent.info.run_id, "pictures")}
    assert "pictures/traversals.png" in artifacts
    table = Path(client.download_artifacts(parent.info.run_id, "results/results.csv", str(sweep_env["home"])))
    with open(table) as fh:
        assert len(list(csv.DictReader(fh))) == 4
    # `aeforge sweep results` reads the same four rows from MLflow.
    assert {r["run_name"] for r in load_sweep(job_id)["rows"]} == {r["run_name"] for r in rows}

    healthy = [r for r in rows if r["health"] == "healthy"]  # only healthy trials are ranked (issue 20)
    assert healthy, rows
    best = max(healthy, key=lambda r: r["eval/mig"])
    version = client.get_model_version_by_alias(spec.registration.model_name, "best")
    assert version.tags["trial_id"] == best["trial_id"]
    with mlflow_uri(sweep_env["tracking_uri"]):
        model = mlflow.pytorch.load_model(f"models:/{spec.registration.model_name}@best", map_location="cpu")
    assert torch.isfinite(model.code_mean).all()
    assert tuple(model(torch.rand(2, 1, 16, 16)).shape) == (2, 1, 16, 16)

    # `aeforge run` on the same job id: the packed sweep restored, nothing trained, its four trials in the table.
    from services import cli

    path = tmp_path / "packed.yaml"
    path.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    result = runner.invoke(cli.app, ["run", str(path), "--job-id", job_id])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("│") and f"{spec.name}-t0" in line]
    assert len(lines) == 4 and best["run_name"] in lines[0]


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_chen2018_study_spec_runs_tiny_and_draws_the_papers_two_pictures(sweep_env, tmp_path):
    """jobs/examples/study_chen2018_short.yaml as it is, cut to toy sizes with `--set`-style settings: beta-VAE and
    beta-TCVAE x 2 betas x 2 seeds in packs on Chen et al.'s MLP, ranked by eval/mig_chen; the parent run and
    `aeforge sweep results --pictures` carry MIG against beta (spread over seeds) and MIG against the ELBO."""
    from jobs.spec import load_spec
    from jobs.sweep import run_sweep
    from services import cli

    name = f"study-tiny-{uuid.uuid4().hex[:6]}"
    spec = load_spec(
        ROOT / "jobs" / "examples" / "study_chen2018_short.yaml",
        [
            f"name={name}",
            "data.limit=2048",
            "train.steps=4",
            "train.batch_size=32",
            "train.log_every=2",
            "train.checkpoint_every=4",
            "eval.iwae_samples=2",
            "eval.max_examples=64",
            "eval.num_train=64",
            "eval.num_test=32",
            "eval.mig_chen_rows=256",
            "eval.mig_chen_samples=256",
            "eval.pictures=false",
            # Nothing here reads the registry: leaving the best of 8 chen2018_mlp models (6.5 M parameters each)
            # unregistered spares uploading it.
            "register=null",
            # 4 steps leave the models collapsed, and a sweep ranks no collapsed trial (issue 20); this test is about
            # the study's pictures, so any unit that moves at all counts as active here.
            "eval.active_unit_variance=1e-12",
            "eval.collapse_kl_per_latent=0",
            "sweep.beta=[1, 4]",
            "sweep.seed=[0, 1]",
            "sweep.pack=4",
        ],
    )  # one pack per variant, both at once
    assert (spec.model.architecture, spec.sweep.metric.name, spec.num_trials()) == ("chen2018_mlp", "eval/mig_chen", 8)
    job_id = f"{name}-job"
    t0 = time.perf_counter()
    outcome = run_sweep(spec, job_id)
    print(f"\ntiny Chen et al. study (8 models): {time.perf_counter() - t0:.1f} s")

    rows = outcome["trials"]
    assert len(rows) == 8 and all(r["status"] == "finished" for r in rows), rows
    assert {(r["variant"], r["beta"], r["seed"]) for r in rows} == {
        (v, b, s) for v in ("beta_vae", "beta_tcvae") for b in (1.0, 4.0) for s in (0, 1)
    }
    assert all(isinstance(r["eval/mig_chen"], float) and 0.0 <= r["eval/mig_chen"] <= 1.0 for r in rows)
    assert all(r["step"] == 4 for r in rows)  # each member's own count, as its worker reported it
    assert outcome["best"]["eval/mig_chen"] == max(r["eval/mig_chen"] for r in rows)

    client = mlflow.MlflowClient(sweep_env["tracking_uri"])
    parent, children = parent_and_children(client, job_id)
    assert len(children) == 8
    artifacts = {f.path for f in client.list_artifacts(parent.info.run_id, "pictures")}
    assert {"pictures/mig_chen_vs_beta.png", "pictures/mig_chen_vs_elbo.png"} <= artifacts

    result = runner.invoke(cli.app, ["sweep", "results", job_id, "--pictures", str(tmp_path / "pics")])
    assert result.exit_code == 0, result.output
    assert "ranked by eval/mig_chen (max)" in result.output
    assert {"mig_chen_vs_beta.png", "mig_chen_vs_elbo.png"} <= {p.name for p in (tmp_path / "pics").iterdir()}


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_sweep_results_cli_prints_the_table(finished_sweep, sweep_env, tmp_path, monkeypatch):
    from services import cli

    spec, job_id, outcome, _ = finished_sweep
    out_csv = tmp_path / "table.csv"
    result = runner.invoke(
        cli.app, ["sweep", "results", job_id, "--csv", str(out_csv), "--pictures", str(tmp_path / "pics")]
    )
    assert result.exit_code == 0, result.output
    # The summary pictures drawn again from MLflow's rows (all but the traversals, which live on storage).
    assert {p.name for p in (tmp_path / "pics").iterdir()} == PICTURES - {"traversals.png"}
    assert f"wrote {tmp_path / 'pics' / 'mig_vs_elbo.png'}" in result.output
    assert "ranked by eval/mig (max)" in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("│") and f"{spec.name}-t0" in line]
    assert len(lines) == 4, result.output
    best = outcome["best"]["run_name"]
    assert best in lines[0]  # best first
    with open(out_csv) as fh:
        assert len(list(csv.DictReader(fh))) == 4

    by_run = runner.invoke(cli.app, ["sweep", "results", outcome["mlflow_run_id"]])
    assert by_run.exit_code == 0 and best in by_run.output

    missing = runner.invoke(cli.app, ["sweep", "results", "no-such-sweep"])
    assert missing.exit_code == 2 and "no sweep with job id" in missing.output


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_aeforge_run_prints_the_sweep_table(finished_sweep, finished_sweep_run_again):
    """`aeforge run SPEC --job-id ID` on the finished sweep: restored, nothing trained (the test above), the table
    printed."""
    spec, job_id, outcome, _ = finished_sweep
    result = finished_sweep_run_again[0]
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("│") and f"{spec.name}-t0" in line]
    assert len(lines) == 4 and outcome["best"]["run_name"] in lines[0]
    assert "@best" in result.output and outcome["mlflow_run_id"] in result.output


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_a_pack_whose_worker_died_resumes_the_whole_pack_from_its_checkpoint(packed_sweep, sweep_env):
    """Rank 1 of a 2-worker pack exits abruptly at step 20; Ray Train restarts the pack's workers, which resume
    every member from the pack's checkpoint of step 15 and finish; no member logs a step twice. (The module's packed
    sweep, whose other pack ran through.)"""
    from jobs.sweep import trial_result_relpath
    from workers.storage import Storage

    _, job_id, outcome, marker = packed_sweep
    assert marker.read_text().startswith("rank 1 exited at step 20")  # the worker did die
    rows = outcome["trials"]
    assert len(rows) == 4 and all(r["status"] == "finished" for r in rows), rows
    storage = Storage.from_settings()
    resumed_from: dict[str, set[int]] = {}  # pack (its Train run) -> the step its members resumed from
    for row in rows:
        result = json.loads(storage.get_bytes(trial_result_relpath(row["trial_job_id"])))
        resumed_from.setdefault(row["trial_job_id"].rsplit("-m", 1)[0], set()).add(result["resumed_from_step"])
    assert len(resumed_from) == 2, resumed_from
    # Every member of a pack resumed from the same step: the whole pack from its checkpoint of step 15 where the
    # worker died (the other pack, which ran through, from 0).
    assert all(len(steps) == 1 for steps in resumed_from.values()), resumed_from
    assert {15} in resumed_from.values() and set().union(*resumed_from.values()) <= {0, 15}, resumed_from
    client = mlflow.MlflowClient(sweep_env["tracking_uri"])
    _, children = parent_and_children(client, job_id)
    for child in children:
        assert child.info.status == "FINISHED"
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "train/loss")]
        assert sorted(steps) == [10, 20, 30]  # step 20, trained again after the resume, is not logged twice
    for run in resumed_from:
        checkpoints = {p.name for p in (sweep_env["home"] / "storage" / "ray" / run).glob("checkpoint_step_*")}
        assert checkpoints == {"checkpoint_step_000000015", "checkpoint_step_000000030"}, run


# --- a killed driver ----------------------------------------------------------------------------------------------


def _experiment_state_trials(storage, prefix: str) -> dict[str, str]:
    """{trial id: status} from the newest experiment state file Tune wrote under ``prefix`` on storage."""
    states = sorted(p for p in storage.list_prefix(prefix) if p.rsplit("/", 1)[-1].startswith("experiment_state-"))
    if not states:
        return {}
    try:
        data = json.loads(storage.get_bytes(states[-1]))
    except ValueError:  # being written
        return {}
    out = {}
    for entry in data.get("trial_data", []):
        trial = json.loads(entry[0]) if isinstance(entry, (list, tuple)) else entry
        out[trial.get("trial_id")] = trial.get("status")
    return out


@pytest.mark.ray
@pytest.mark.timeout(300)
@pytest.mark.parametrize("pack", [1, 2])
def test_a_sweep_whose_driver_was_killed_continues_without_retraining_finished_trials(
    sweep_env, s3_bucket, tmp_path, monkeypatch, pack
):
    """The sweep runs as the queue runs it (`python -m jobs.run JOB_ID` in its own process, joined to the same Ray
    cluster), one trial (or pack of two) at a time, with its storage (Tune's experiment, Train checkpoints) on S3
    (moto); its driver is killed once the first trial (or pack) has finished (as Tune's saved experiment state and
    the trials' result files show), then the same job id runs again here."""
    import ray

    from jobs.sweep import member_trial_id, run_sweep, trial_result_relpath
    from workers.storage import Storage

    endpoint, bucket = s3_bucket
    monkeypatch.setenv("AEFORGE_STORAGE", f"s3://{bucket}/aeforge")
    monkeypatch.setenv("AEFORGE_S3_ENDPOINT_URL", endpoint)
    name = f"sweep-killed-{uuid.uuid4().hex[:6]}"
    # Ranked by eval/elbo, with no disentanglement scores and no pictures: this test is about what a re-run trains.
    sweep = {
        "beta": [1, 4],
        "latent_dim": [2],
        "max_concurrent_trials": 1,
        "metric": {"name": "eval/elbo", "mode": "max"},
    }
    if pack > 1:
        sweep.update(seed=[0, 1], pack=pack)
    quiet_eval = {"disentanglement": False, "pictures": False, "probe": False}
    spec_text = yaml.safe_dump(spec_dict(sweep_env["data"], name, sweep=sweep, eval=quiet_eval, register=None))

    def trial_jobs(trial_id: str) -> list[str]:
        if pack == 1:
            return [f"{job_id}-{trial_id}"]
        return [f"{job_id}-{member_trial_id(trial_id, k)}" for k in range(pack)]

    job_id = f"{name}-job"
    storage = Storage.from_settings()
    t0 = time.perf_counter()
    driver = start_sweep_driver(spec_text, job_id, tmp_path / "driver.log")
    finished_before_kill: set[str] = set()
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and driver.poll() is None:
            states = _experiment_state_trials(storage, f"tune/{job_id}")
            done = {j for t in states for j in trial_jobs(t) if storage.exists(trial_result_relpath(j))}
            if done:
                finished_before_kill = done
                break
            time.sleep(0.5)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
    assert finished_before_kill, (
        f"no trial finished before the driver ended:\n{(tmp_path / 'driver.log').read_text()[-3000:]}"
    )
    print(f"\ndriver killed after {time.perf_counter() - t0:.1f} s with {len(finished_before_kill)} trial(s) finished")

    client = mlflow.MlflowClient(sweep_env["tracking_uri"])
    _, children = parent_and_children(client, job_id)
    fits_before = fits_per_trial(client, children)

    # Ray frees the killed driver's actors and placement groups: wait for the CPUs to come back.
    deadline = time.monotonic() + 60
    while ray.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)

    t1 = time.perf_counter()
    outcome = run_sweep(parse_spec(spec_text), job_id)
    print(f"re-run after the kill: {time.perf_counter() - t1:.1f} s")

    rows = outcome["trials"]
    trials = 2 * pack
    assert len(rows) == trials and all(r["status"] == "finished" for r in rows), rows
    parent, children = parent_and_children(client, job_id)
    assert len(children) == trials and parent.info.status == "FINISHED"
    if pack == 1:
        fits_after = fits_per_trial(client, children)
        for trial_job in finished_before_kill:
            assert fits_after[trial_job] == fits_before[trial_job] == 1, (fits_before, fits_after)
        assert all(n >= 1 for n in fits_after.values())
    else:
        # A finished pack's members were not trained again: each logged its curve once.
        by_job = {c.data.tags["aeforge.job_id"]: c for c in children}
        for trial_job in finished_before_kill:
            history = client.get_metric_history(by_job[trial_job].info.run_id, "train/loss")
            assert [m.step for m in history] == [10, 20, 30], trial_job
    # The Train runs' checkpoints, on S3 (a pack's run is named after the pack: its members' job id less "-m<k>").
    train_runs = {r["trial_job_id"] if pack == 1 else r["trial_job_id"].rsplit("-m", 1)[0] for r in rows}
    assert all(storage.list_prefix(f"ray/{run}") for run in train_runs)
    # Tune pickles its storage filesystem into its experiment files: the S3 keys must not travel with it.
    secret = sweep_env["secret"].encode()
    objects = storage.list_prefix("")
    assert any("/tuner.pkl" in o for o in objects) and any("experiment_state-" in o for o in objects)
    assert not [o for o in objects if secret in storage.get_bytes(o) or secret.hex().encode() in storage.get_bytes(o)]


@pytest.mark.ray
@pytest.mark.timeout(300)
@pytest.mark.parametrize("pack", [1, 2])
def test_a_sweep_stopped_by_sigterm_checkpoints_its_trial_at_the_current_step_and_resumes_from_it(
    sweep_env, tmp_path, pack
):
    """The queue's preemption of a sweep: its driver (`python -m jobs.run JOB_ID`, as the queue runs it) gets
    SIGTERM while its one trial (or pack of two) trains. The workers checkpoint at their current step (there is no
    periodic checkpoint before the end: checkpoint_every is the step budget), no trial is recorded as finished, and
    the same job id run again resumes from that step: no step is trained twice."""
    import ray

    from jobs.sweep import run_sweep, trial_result_relpath
    from workers.storage import Storage

    name = f"sweep-stopped-{uuid.uuid4().hex[:6]}"
    steps, log_every = 3000, 50
    sweep = {"beta": [1], "latent_dim": [2], "max_concurrent_trials": 1, "metric": {"name": "eval/elbo", "mode": "max"}}
    if pack > 1:
        sweep.update(seed=[0, 1], pack=pack)
    quiet_eval = {"disentanglement": False, "pictures": False, "probe": False}
    train = {"steps": steps, "log_every": log_every, "checkpoint_every": steps}
    spec_text = yaml.safe_dump(
        spec_dict(sweep_env["data"], name, sweep=sweep, eval=quiet_eval, train=train, register=None)
    )
    job_id = f"{name}-job"
    storage = Storage.from_settings()
    log_path = tmp_path / "driver.log"
    t0 = time.perf_counter()
    # The graceful stop's grace period (this less 10 s) outlasts a loaded machine's stop: no Ctrl-C fallback.
    driver = start_sweep_driver(spec_text, job_id, log_path, RAY_JOB_STOP_WAIT_TIME_S="60")
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and driver.poll() is None:
            if '"step": ' in log_path.read_text(errors="replace"):  # the trial trains (a progress line)
                break
            time.sleep(0.2)
        assert driver.poll() is None, log_path.read_text()[-3000:]
        driver.send_signal(signal.SIGTERM)
        t_term = time.perf_counter()
        driver.wait(timeout=90)
        stop_seconds = time.perf_counter() - t_term
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait(timeout=30)
    text = log_path.read_text(errors="replace")
    found = re.search(r"stopped at step (\d+) \(checkpointed there\)", text)
    assert found, text[-3000:]
    stopped_at = int(found.group(1))
    assert 0 < stopped_at < steps and stopped_at % log_every == 0

    client = mlflow.MlflowClient(sweep_env["tracking_uri"])
    parent, children = parent_and_children(client, job_id)
    assert len(children) == pack
    trial_jobs = sorted(c.data.tags["aeforge.job_id"] for c in children)
    # Not finished: no trial.json, Tune holds the trial as errored (to resume), the runs ended KILLED.
    assert not [j for j in trial_jobs if storage.exists(trial_result_relpath(j))]
    assert set(_experiment_state_trials(storage, f"tune/{job_id}").values()) == {"ERROR"}
    assert {parent.info.status} | {c.info.status for c in children} == {"KILLED"}
    # The Train run's one checkpoint is the stop's, at the stop step itself (a pack's run: its members' job id
    # less "-m<k>").
    train_run = trial_jobs[0] if pack == 1 else trial_jobs[0].rsplit("-m", 1)[0]
    checkpoints = {p.split("/")[2] for p in storage.list_prefix(f"ray/{train_run}/") if "/checkpoint_step_" in p}
    assert checkpoints == {f"checkpoint_step_{stopped_at:09d}"}, checkpoints
    print(
        f"\nSIGTERM {t_term - t0:.1f} s after the start; stopped at step {stopped_at} of {steps}, the driver gone "
        f"{stop_seconds:.1f} s after the signal"
    )

    # The stopped driver's actors and placement groups are gone: every CPU is free again.
    deadline = time.monotonic() + 60
    while ray.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ray.available_resources().get("CPU", 0) >= 2, ray.available_resources()
    t1 = time.perf_counter()
    outcome = run_sweep(parse_spec(spec_text), job_id)
    print(f"re-run: {time.perf_counter() - t1:.1f} s")

    rows = outcome["trials"]
    assert len(rows) == pack and all(r["status"] == "finished" and r["step"] == steps for r in rows), rows
    for child in children:
        run_id = child.info.run_id
        assert client.get_run(run_id).info.status == "FINISHED"
        # Each log window's curve point logged once, from the first to the last.
        logged = [m.step for m in client.get_metric_history(run_id, "train/loss")]
        assert sorted(logged) == list(range(log_every, steps + 1, log_every)), logged
        # Resumed once, from the stop step (a trial's chief logs it on its run; a pack records it per member).
        if pack == 1:
            resumed = [(m.step, m.value) for m in client.get_metric_history(run_id, "resume/from_step")]
            assert resumed == [(stopped_at, stopped_at)]
        else:
            record = json.loads(storage.get_bytes(trial_result_relpath(child.data.tags["aeforge.job_id"])))
            assert record["resumed_from_step"] == stopped_at, record


# --- validation before anything starts -------------------------------------------------------------------------


@pytest.mark.ray
@pytest.mark.timeout(60)
def test_trials_that_can_never_fit_the_cluster_stop_the_sweep_before_it_starts(sweep_env):
    from jobs.sweep import run_sweep

    name = f"sweep-too-big-{uuid.uuid4().hex[:6]}"
    spec = make_spec(sweep_env["data"], name, resources={"workers": 2, "cpus_per_worker": 1})
    errs = errors_of(lambda: run_sweep(spec, f"{name}-job"))
    assert "no trial can ever start" in errs["resources"] and "2 CPU" in errs["resources"]
    assert mlflow.MlflowClient(sweep_env["tracking_uri"]).get_experiment_by_name(name) is None
    assert not (sweep_env["home"] / "storage" / "tune" / f"{name}-job").exists()


def test_cluster_fit_counts_each_trials_driver():
    spec = JobSpec.model_validate(spec_dict(Path("x.npz"), "fit", sweep={"max_concurrent_trials": None}))
    assert trials_that_fit(spec.resources, {"CPU": 2.0}) == 3  # 3 x (0.5 + 0.01) <= 2
    assert check_cluster(spec, {"CPU": 2.0}) == 3
    whole = spec.model_copy(update={"resources": spec.resources.model_copy(update={"cpus_per_worker": 1.0})})
    assert trials_that_fit(whole.resources, {"CPU": 2.0}) == 1  # 2 x 1.01 > 2: the second would wait on its workers
    capped = JobSpec.model_validate(spec_dict(Path("x.npz"), "fit", sweep={"max_concurrent_trials": 8}))
    assert check_cluster(capped, {"CPU": 2.0}) == 3  # a cap above what fits is cut to what fits
    gpu = JobSpec.model_validate(spec_dict(Path("x.npz"), "fit", resources={"workers": 1, "gpus_per_worker": 1}))
    errs = errors_of(lambda: check_cluster(gpu, {"CPU": 16.0}))
    assert "1 GPU" in errs["resources"] and "0 GPU in all" in errs["resources"]


def test_a_metric_that_needs_factors_on_data_without_factors_is_an_error(tmp_path):
    plain = write_plain_npz(tmp_path / "plain.npz")
    spec = make_spec(plain, "no-factors")
    errs = errors_of(lambda: check_data(spec))
    assert "no trial reports 'eval/mig': the data has no ground-truth factors" in errs["sweep.metric.name"]
    # ... and `aeforge validate` says so, before anything runs.
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec_dict(plain, "no-factors")))
    from services.cli import app

    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2 and "sweep.metric.name" in result.output and "Traceback" not in result.output
    # With factors the same spec is fine.
    assert check_data(make_spec(write_factor_npz(tmp_path / "sq.npz"), "factors"))["has_factors"]


@pytest.mark.parametrize(
    "sweep, extra, loc, words",
    [
        ({"beta": [], "latent_dim": [2, 3]}, {}, "sweep.beta", "empty list searches nothing"),
        ({"beta": None, "latent_dim": None}, {}, "sweep", "search space is empty"),
        (
            {"beta": {"start": 1, "stop": 8, "num": 4, "spacing": "log"}, "metric": {"name": "eval/fid"}},
            {},
            "sweep.metric.name",
            "no trial reports 'eval/fid'",
        ),
        ({"metric": {"name": "train/tc"}}, {}, "sweep.metric.name", "no trial reports 'train/tc'"),
        (
            {"metric": {"name": "eval/mig"}},
            {"eval": {"disentanglement": False}},
            "sweep.metric.name",
            "eval.disentanglement is off",
        ),
        (
            {"beta": None, "variant": ["ae", "beta_vae"], "metric": {"name": "eval/mig_exact"}},
            {"model": {"variant": "beta_vae", "architecture": "mlp"}},
            "sweep.metric.name",
            "needs a posterior",
        ),
        ({"pack": 2, "search": "random", "num_samples": 4}, {}, "sweep.pack", "packs need search: grid"),
        ({"pack": 0}, {}, "sweep.pack", "at least 1 trial"),
        ({"pack": "some"}, {}, "sweep.pack", "auto"),
    ],
)
def test_sweep_spec_errors_name_their_field(sweep, extra, loc, words):
    text = yaml.safe_dump(spec_dict(Path("x.npz"), "bad", sweep=sweep, **extra))
    errs = errors_of(lambda: parse_spec(text))
    assert words in errs[loc], errs


def test_grid_and_random_search_spaces():
    from jobs.sweep import param_space

    spec = JobSpec.model_validate(spec_dict(Path("x.npz"), "space"))
    grid = param_space(spec)["trial"]["grid_search"]
    assert {(t["beta"], t["latent_dim"]) for t in grid} == GRID and spec.num_trials() == 4
    random_spec = JobSpec.model_validate(
        spec_dict(
            Path("x.npz"),
            "space",
            sweep={
                "beta": {"start": 0.5, "stop": 16, "num": 3, "spacing": "log"},
                "search": "random",
                "num_samples": 5,
            },
        )
    )
    space = param_space(random_spec)
    assert random_spec.num_trials() == 5
    assert space["beta"].lower >= 0.5 and space["beta"].upper == 16  # sampled on a log scale over the range
    assert space["latent_dim"].categories == [2, 3]


def test_tunes_s3_filesystem_pickles_without_the_keys(monkeypatch):
    """Tune writes its filesystem, pickled, into the experiment's files on storage: no keys in that pickle; where it
    is unpickled the keys come from the environment."""
    import cloudpickle
    import pyarrow.fs

    from workers.storage import Storage
    from workers.storage.ray_fs import tune_filesystem

    secret = f"tune-secret-{uuid.uuid4().hex}"
    monkeypatch.setenv("AEFORGE_STORAGE", "s3://some-bucket/aeforge")
    monkeypatch.setenv("AEFORGE_S3_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "tune-key-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    fs, base = tune_filesystem(Storage.from_settings(), "s3-keys/job")
    assert base == "some-bucket/aeforge" and isinstance(fs, pyarrow.fs.S3FileSystem)
    for dumped in (pickle.dumps(fs), cloudpickle.dumps(fs)):
        assert secret.encode() not in dumped and b"tune-key-id" not in dumped
    again = pickle.loads(pickle.dumps(fs))
    assert isinstance(again, pyarrow.fs.S3FileSystem) and again.region == fs.region
    assert pickle.dumps(again) == pickle.dumps(fs)
    local, _ = tune_filesystem(Storage.from_uri("file:///tmp/x", cache_dir=Path("/tmp/x-cache")))
    assert isinstance(local, pyarrow.fs.LocalFileSystem)


# --- the summary pictures --------------------------------------------------------------------------------------


def test_summary_pictures_draw_one_curve_per_latent_size(tmp_path):
    from PIL import Image

    rows = []
    for beta in (1.0, 4.0, 16.0):
        for latent in (2, 3):
            rows.append(
                {
                    "beta": beta,
                    "latent_dim": latent,
                    "status": "finished",
                    "run_name": f"t-{beta}-{latent}",
                    "eval/elbo": -beta - latent,
                    "eval/recon": beta,
                    "eval/mig": 0.1 * latent,
                }
            )
    rows.append({"beta": 2.0, "latent_dim": 2, "status": "error", "run_name": "broken"})
    curves = _curves(rows, "eval/elbo")
    assert set(curves) == {"z=2", "z=3"} and [b for b, _ in curves["z=2"]] == [1.0, 4.0, 16.0]
    assert curves["z=2"][0] == (1.0, [-3.0])  # each beta's values, one per seed

    tile = tmp_path / "tile.png"
    Image.new("L", (40, 90), 128).save(tile)
    made = sweep_summary_pictures(rows, "eval/elbo", tmp_path / "pics", traversal_for=lambda row: tile)
    assert {p.name for p in made.values()} == {
        "elbo_vs_beta.png",
        "recon_vs_beta.png",
        "mig_vs_beta.png",
        "elbo_heatmap.png",
        "recon_vs_mig.png",
        "traversals.png",
        "mig_vs_elbo.png",
    }
    # Without factors there is no MIG picture; trials without a traversal are left out of the grid.
    for row in rows:
        row.pop("eval/mig", None)
    made = sweep_summary_pictures(rows, "eval/elbo", tmp_path / "pics2", traversal_for=lambda row: None)
    assert set(made) == {"elbo_vs_beta", "recon_vs_beta", "elbo_heatmap"}


class mlflow_uri:
    """MLflow's global tracking URI for a block (model loading reads only the global one)."""

    def __init__(self, uri: str):
        self.uri = uri

    def __enter__(self):
        from workers.tracking import use_tracking_uri

        self._cm = use_tracking_uri(self.uri)
        self._cm.__enter__()

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)


def test_packs_group_trials_of_one_variant_and_latent_size_in_grid_order(tmp_path):
    spec = make_spec(
        write_plain_npz(tmp_path / "p.npz"),
        "packs",
        model={"variant": "beta_vae"},
        sweep={
            "beta": [1, 4],
            "latent_dim": [2, 3],
            "seed": [0, 1, 2],
            "pack": 2,
            "metric": {"name": "eval/elbo", "mode": "max"},
        },
    )
    packs = spec.trial_packs(2)
    assert [[row["index"] for row in pack] for pack in packs] == [[0, 1], [2, 6], [7, 8], [3, 4], [5, 9], [10, 11]]
    for pack in packs:
        assert len({row["latent_dim"] for row in pack}) == 1
    assert spec.pack_size(4) == (2, "sweep.pack: 2")
    auto = spec.model_copy(update={"sweep": spec.sweep.model_copy(update={"pack": "auto"})})
    assert auto.pack_size(2) == (3, "sweep.pack auto: 3 (the largest group of 6 trials over 2 at once)")
    # With the device's free memory: as many models as half of it holds, counted for the largest model (z = 3).
    from workers.pack import training_bytes

    need = training_bytes(auto.with_trial({"beta": 1.0, "latent_dim": 3}).model, (1, 8, 8), 64, 16)
    assert 0 < training_bytes(auto.with_trial({"beta": 1.0, "latent_dim": 2}).model, (1, 8, 8), 64, 16) < need
    size, why = auto.pack_size(2, free_bytes=4 * need, image_shape=(1, 8, 8), dataset_size=64)
    assert size == 2 and "2 fit in half of" in why
    assert auto.pack_size(1, free_bytes=1e12, image_shape=(1, 8, 8), dataset_size=64)[0] == 6


def test_a_model_s_training_memory_grows_with_its_batch_and_counts_its_adam_state():
    from workers.config import ModelConfig
    from workers.pack import training_bytes

    config = ModelConfig(variant="beta_tcvae", architecture="conv64", latent_dim=10)
    small, large = (training_bytes(config, (1, 64, 64), 737_280, b) for b in (64, 128))
    parameters = 4 * sum(
        p.numel()
        for p in __import__("workers.models", fromlist=["build_model"])
        .build_model(config, (1, 64, 64), 737_280)
        .parameters()
    )
    assert 4 * parameters < small < large < 2 * small  # Adam's moments and the gradients, then activations


def test_validate_says_which_trials_go_together_in_packs(tmp_path):
    from services.cli import app

    spec = spec_dict(
        write_plain_npz(tmp_path / "p.npz"),
        "packs",
        sweep={
            "beta": [1, 4],
            "latent_dim": [2, 3],
            "seed": [0, 1],
            "pack": 2,
            "metric": {"name": "eval/elbo", "mode": "max"},
        },
    )
    path = tmp_path / "packs.yaml"
    path.write_text(yaml.safe_dump(spec))
    result = runner.invoke(app, ["validate", str(path), "--no-data"])
    assert result.exit_code == 0, result.output
    assert "sweep.pack 2: 4 packs: t00, t01; t04, t05; t02, t03; t06, t07" in result.output
    spec["sweep"]["pack"] = "auto"
    path.write_text(yaml.safe_dump(spec))
    result = runner.invoke(app, ["validate", str(path), "--no-data"])
    assert result.exit_code == 0 and "(2 groups: t00, t01, t04, t05; t02, t03, t06, t07)" in result.output


def test_the_papers_two_pictures_mig_against_beta_with_the_seeds_spread_and_mig_against_the_elbo(tmp_path):
    """Chen et al. 2018's study pictures from a results table of 2 variants x 3 betas x 3 seeds ranked by
    eval/mig_chen: the spread over seeds shows as a band and dots, and every model is a point against its ELBO."""
    from PIL import Image

    rows = []
    for variant, lift in (("beta_vae", 0.0), ("beta_tcvae", 0.1)):
        for beta in (1.0, 4.0, 8.0):
            for seed in (0, 1, 2):
                rows.append(
                    {
                        "variant": variant,
                        "beta": beta,
                        "seed": seed,
                        "status": "finished",
                        "run_name": f"{variant}-{beta}-{seed}",
                        "eval/elbo": -80 - 2 * beta - seed,
                        "eval/recon": 70 + beta,
                        "eval/mig": 0.1,
                        "eval/mig_chen": 0.05 * seed + lift + beta / 80,
                    }
                )
    curves = _curves(rows, "eval/mig_chen")
    assert set(curves) == {"beta_vae", "beta_tcvae"} and len(curves["beta_tcvae"][1][1]) == 3
    made = sweep_summary_pictures(rows, "eval/mig_chen", tmp_path / "pics", mode="max")
    assert {"mig_chen_vs_beta", "mig_chen_vs_elbo", "mig_chen_heatmap", "recon_vs_beta"} <= set(made)
    assert "traversals" not in made  # no traversal source given
    for name in ("mig_chen_vs_beta", "mig_chen_vs_elbo"):
        with Image.open(made[name]) as image:
            assert image.size[0] >= 600 and image.size[1] >= 400
            # Both pictures are drawn in colour (the variants' and the band's), not left blank.
            assert len(image.convert("RGB").getcolors(maxcolors=1 << 16) or []) > 50
