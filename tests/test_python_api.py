"""The README's "Python API": its code blocks run as written, so the documentation cannot drift from the code.

- Loading a registered model: a model is registered by the real registration code (jobs.registry.log_and_register)
  on a real `mlflow server`; the README's first block then runs in a fresh Python process, outside the checkout,
  that imports only mlflow and torch, and what it computed is checked against the model that was registered.
- Submitting and waiting: the README's second block runs against the queue's API served over HTTP by uvicorn, with
  the dispatcher and a fake Ray (tests/services/fakes.py) that runs each job through PENDING, RUNNING, SUCCEEDED.
- The model methods a notebook calls (encode, decode, sample, traverse) on each kind of model.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from jobs.spec import JobSpec
from workers.config import ModelConfig
from workers.models import build_model
from workers.models.base import NoPrior

REPO = Path(__file__).resolve().parents[1]
IMAGE_SHAPE = (1, 16, 16)


def readme_python_blocks() -> list[str]:
    """The ```python blocks of the README's "## Python API" section, in order."""
    text = (REPO / "README.md").read_text()
    match = re.search(r"^## Python API\n(.*?)^## ", text, flags=re.S | re.M)
    assert match, "README.md has no '## Python API' section"
    return re.findall(r"^```python\n(.*?)^```", match.group(1), flags=re.S | re.M)


def test_the_readme_has_the_two_blocks():
    load, submit = readme_python_blocks()
    assert [line for line in load.splitlines() if line.startswith(("import", "from"))] == [
        "import mlflow",
        "import torch",
    ]
    assert 'mlflow.pytorch.load_model("models:/' in load and "AeforgeClient.from_settings()" in submit
    assert "client.wait(" in submit


# --- loading a registered model -------------------------------------------------------------------------------


def small_model(variant: str, latent_dim: int = 4):
    torch.manual_seed(0)
    config = ModelConfig(variant=variant, architecture="mlp", latent_dim=latent_dim, hidden_dims=[32])
    return build_model(config, IMAGE_SHAPE, dataset_size=100)


@pytest.mark.timeout(300)
def test_readme_loads_a_registered_model_in_a_fresh_process(mlflow_server, tmp_path, monkeypatch):
    from jobs.registry import log_and_register
    from workers.tracking import ensure_experiment, start_or_resume_run

    load_block, _ = readme_python_blocks()
    ref = re.search(r'load_model\("models:/([^"@]+)@([^"]+)"\)', load_block)
    name, alias = ref.group(1), ref.group(2)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", str(mlflow_server))
    monkeypatch.setenv("AEFORGE_HOME", str(tmp_path / "home"))
    spec = JobSpec.model_validate(
        {
            "name": name,
            "model": {"variant": "beta_tcvae", "architecture": "mlp", "latent_dim": 4, "hidden_dims": [32]},
            "train": {"steps": 10},
            "register": {"model_name": name, "alias": alias},
        }
    )
    model = small_model("beta_tcvae").eval()
    run_id = start_or_resume_run(ensure_experiment(spec.name), "python-api-test")
    registered = log_and_register(model, spec, "python-api-test", run_id, {"eval/elbo": -10.0})
    assert registered["alias"] == alias

    # The block as written, then what it computed, saved for this process to check.
    results = tmp_path / "notebook.pt"
    script = (
        load_block + "\nimport sys\n"
        f"torch.save({{'x': x, 'z': z, 'reconstructions': reconstructions, 'samples': samples, 'rows': rows,"
        f" 'class': type(model).__module__ + '.' + type(model).__name__,"
        f" 'aeforge_modules': sorted(m for m in ('workers', 'jobs', 'services') if m in sys.modules)}}, "
        f"{str(results)!r})\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AEFORGE_", "PYTHON"))}
    env["MLFLOW_TRACKING_URI"] = str(mlflow_server)
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.strip().splitlines()[-1] == "(8, 4) (8, 1, 16, 16) (16, 1, 16, 16) (4, 9, 1, 16, 16)"
    print(f"the README block ran in a fresh process in {time.monotonic() - started:.1f} s")

    got = torch.load(results, weights_only=False)
    assert got["class"] == "workers.models.beta_tcvae.BetaTCVAE"
    assert got["aeforge_modules"] == ["workers"]  # imported by the unpickling alone: aeforge must be installed
    torch.testing.assert_close(got["z"], model.encode(got["x"]).mean)
    torch.testing.assert_close(got["reconstructions"], model.decode(got["z"]))
    torch.testing.assert_close(got["samples"], model.sample(16, generator=torch.Generator().manual_seed(0)))
    torch.testing.assert_close(got["rows"], model.traverse(got["x"][0], steps=9))


# --- the model methods ---------------------------------------------------------------------------------------


def decoded(model, codes: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.decode(codes)


@pytest.mark.parametrize("variant", ["vae", "beta_vae", "beta_tcvae"])
def test_traverse_of_the_vae_family_spans_the_prior(variant):
    model = small_model(variant)
    x = torch.rand(3, *IMAGE_SHAPE, generator=torch.Generator().manual_seed(1))
    rows = model.traverse(x[1], steps=5)
    assert rows.shape == (4, 5, *IMAGE_SHAPE)
    start = model.encode(x[1:2]).mean[0].detach()
    for d in range(4):
        codes = start.repeat(5, 1)
        codes[:, d] = torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0])
        torch.testing.assert_close(rows[d], decoded(model, codes))
    # Without an image: from the prior's centre; sds widens the span.
    codes = torch.zeros(3, 4)
    codes[:, 2] = torch.tensor([-3.0, 0.0, 3.0])
    torch.testing.assert_close(model.traverse(steps=3, sds=3.0)[2], decoded(model, codes))
    assert model.sample(6, generator=torch.Generator().manual_seed(0)).shape == (6, *IMAGE_SHAPE)


@pytest.mark.parametrize("variant", ["ae", "dae"])
def test_traverse_of_an_autoencoder_spans_its_recorded_codes(variant):
    model = small_model(variant, latent_dim=3)
    with pytest.raises(NoPrior, match="no prior to sample from"):
        model.sample(4)
    with pytest.raises(NoPrior, match="no recorded code statistics"):
        model.traverse(torch.rand(*IMAGE_SHAPE))

    data = torch.rand(64, *IMAGE_SHAPE, generator=torch.Generator().manual_seed(2))
    stats = model.record_code_statistics(data.split(16))
    low, high = stats.mean - 2 * stats.std, stats.mean + 2 * stats.std
    rows = model.traverse(steps=3)  # from the codes' mean, over mean +- 2 sd of each dimension
    for d in range(3):
        codes = stats.mean.repeat(3, 1)
        codes[:, d] = torch.stack([low[d], stats.mean[d], high[d]])
        torch.testing.assert_close(rows[d], decoded(model, codes))
    ranges = torch.tensor([[0.0, 1.0], [-1.0, 1.0], [2.0, 4.0]])
    start = model.encode(data[:1]).mean[0].detach()
    codes = start.repeat(2, 1)
    codes[:, 2] = torch.tensor([2.0, 4.0])
    torch.testing.assert_close(model.traverse(data[0], steps=2, ranges=ranges)[2], decoded(model, codes))
    with pytest.raises(ValueError, match="steps must be at least 2"):
        model.traverse(steps=1)


def test_traverse_of_an_old_autoencoder_takes_an_image_and_ranges():
    model = small_model("ae", latent_dim=2)  # no statistics recorded, as a model saved before they were
    x = torch.rand(*IMAGE_SHAPE)
    rows = model.traverse(x, steps=4, ranges=torch.tensor([[-1.0, 1.0], [0.0, 3.0]]))
    assert rows.shape == (2, 4, *IMAGE_SHAPE) and float(rows.min()) >= 0.0 and float(rows.max()) <= 1.0


# --- submitting and waiting ------------------------------------------------------------------------------------


@pytest.fixture
def served_queue(tmp_path, monkeypatch):
    """The queue's API over HTTP (uvicorn on a free port) with its dispatcher, in front of a fake Ray whose jobs
    succeed and print an AEFORGE_RESULT line as jobs.run does (unless ``ray_paused`` is set); AEFORGE_API_URL and
    AEFORGE_API_TOKEN point at it. Yields (store, ray_paused)."""
    from services.api import create_app
    from services.dispatcher import Dispatcher
    from services.settings import Principal, ServiceSettings
    from services.store import Store
    from tests.fixtures.processes import serving_in_thread
    from tests.services.fakes import FakeCluster, FakeLauncher
    from workers.protocol import result_line

    store = Store(f"sqlite:///{tmp_path / 'queue.db'}")
    launcher = FakeLauncher()
    settings = ServiceSettings(
        home=tmp_path, db_url="unused", dispatch_interval_s=0.05, tokens=(Principal("nora", "user", "nora-token-123"),)
    )
    dispatcher = Dispatcher(store, FakeCluster({"CPU": 2}), launcher, environ={})
    stop, ray_paused = threading.Event(), threading.Event()

    def ray():
        while not stop.wait(0.05):
            if ray_paused.is_set():
                continue
            for sid, job in list(launcher.jobs.items()):
                if job["status"] == "PENDING":
                    launcher.set(sid, "RUNNING", logs="training\n")
                elif job["status"] == "RUNNING":
                    result = {
                        "job_id": sid,
                        "mlflow_run_id": "run-1",
                        "metrics": {"eval/elbo": -42.5},
                        "model": {
                            "model_uri": "models:/quickstart-btcvae/1",
                            "name": "quickstart-btcvae",
                            "version": "1",
                            "alias": "candidate",
                        },
                    }
                    launcher.set(sid, "SUCCEEDED", logs=job["logs"] + result_line(result) + "\n")

    fake_ray = threading.Thread(target=ray, daemon=True)
    fake_ray.start()
    try:
        with serving_in_thread(create_app(store, settings, launcher=launcher, dispatcher=dispatcher)) as url:
            monkeypatch.setenv("AEFORGE_API_URL", url)
            monkeypatch.setenv("AEFORGE_API_TOKEN", "nora-token-123")
            monkeypatch.setenv("AEFORGE_HOME", str(tmp_path / "home"))
            yield SimpleNamespace(store=store, ray_paused=ray_paused)
    finally:
        stop.set()
        fake_ray.join(timeout=30)
        store.close()


@pytest.mark.timeout(120)
def test_readme_submits_and_waits_for_a_job(served_queue, monkeypatch, capsys):
    _, submit_block = readme_python_blocks()
    monkeypatch.chdir(REPO)  # the block opens jobs/examples/quickstart.yaml, as from a checkout
    exec(compile(submit_block, "README.md (Python API)", "exec"), {})
    assert capsys.readouterr().out.strip() == "models:/quickstart-btcvae/1 -42.5"
    [job] = served_queue.store.list_jobs()[0]
    assert job.state == "succeeded" and job.owner == "nora" and job.name == "quickstart"


@pytest.mark.timeout(60)
def test_wait_gives_up_after_its_timeout_with_the_job_as_it_was(served_queue):
    from services.client import AeforgeClient, WaitTimeout

    client = AeforgeClient.from_settings()
    served_queue.ray_paused.set()  # the fake Ray leaves its jobs PENDING: the job cannot end while we wait
    try:
        job = client.submit((REPO / "jobs" / "examples" / "quickstart.yaml").read_text())
        started = time.monotonic()
        with pytest.raises(WaitTimeout, match=f"^job {job['id']} is still (queued|starting) after 0.3 s$") as info:
            client.wait(job["id"], timeout_s=0.3, poll_s=0.05)
        assert info.value.job["id"] == job["id"] and info.value.job["state"] in ("queued", "starting")
        assert 0.3 <= time.monotonic() - started < 5
        served_queue.ray_paused.clear()
        final = client.wait(job["id"], timeout_s=30, poll_s=0.05)
        assert final["state"] == "succeeded" and final["result"]["metrics"] == {"eval/elbo": -42.5}
    finally:
        client.close()
