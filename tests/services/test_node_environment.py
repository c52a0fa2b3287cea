"""A Ray node whose Python cannot import torch (issue 20): `aeforge doctor` fails it by name with how to fix it, and a
queued job on it fails once, at once, with the one import-error line, not three attempts "resuming from a
checkpoint".

The node is a real `ray start --head` whose environment puts a ``torch`` package first on its Python's path that
raises ModuleNotFoundError on import, as a node whose environment lacks torch does; the service and this test keep
the real one.
"""

from __future__ import annotations

import sys
import time

import pytest
from typer.testing import CliRunner

from services import cli
from tests.services.test_doctor import lines_by_check
from tests.services.test_e2e import Service, started_ray_head

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]

SPEC = """\
name: no-torch-here
model: {variant: vae, architecture: mlp, latent_dim: 2, hidden_dims: [8]}
data: {source: "builtin:dsprites", limit: 64}
train: {steps: 2, batch_size: 8}
resources: {workers: 1, cpus_per_worker: 1}
"""


@pytest.fixture(scope="module")
def no_torch(tmp_path_factory):
    """A folder whose ``torch`` package raises ModuleNotFoundError, and a `python` that puts it first on its path
    (a job's runtime environment sets PYTHONPATH, so the job's interpreter, AEFORGE_JOB_PYTHON, is this one)."""
    folder = tmp_path_factory.mktemp("no-torch")
    (folder / "torch").mkdir()
    (folder / "torch" / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'torch'\", name='torch')  # this Python has no torch\n"
    )
    python = folder / "python"
    python.write_text(f'#!/bin/sh\nPYTHONPATH="{folder}${{PYTHONPATH:+:$PYTHONPATH}}" exec {sys.executable} "$@"\n')
    python.chmod(0o755)
    return folder, python


@pytest.fixture(scope="module")
def head_without_torch(no_torch):
    with started_ray_head({"PYTHONPATH": str(no_torch[0])}) as head:
        yield head


def test_doctor_fails_a_node_whose_python_lacks_torch_and_says_how_to_fix_it(head_without_torch, tmp_path):
    env = {
        "COLUMNS": None,
        "RAY_ADDRESS": head_without_torch.address,
        "AEFORGE_HOME": str(tmp_path),
        "AEFORGE_API_URL": None,
        "MLFLOW_TRACKING_URI": None,
    }
    result = CliRunner().invoke(cli.app, ["doctor", "--timeout", "20"], env=env)
    assert result.exit_code == 1, result.output
    line = lines_by_check(result.output)["Ray nodes"]
    assert line.startswith("FAIL"), result.output
    assert "No module named 'torch'" in line and "install aeforge and its dependencies" in line


def test_a_job_on_that_node_fails_once_with_the_import_error_line(head_without_torch, no_torch, tmp_path):
    service = Service(
        tmp_path / "home", head_without_torch, job_module=None, extra_env={"AEFORGE_JOB_PYTHON": str(no_torch[1])}
    )
    try:
        service.start()
        response = service.http.post("/jobs", json={"spec": SPEC, "max_attempts": 3})
        assert response.status_code == 201, response.text
        job_id = response.json()["id"]
        deadline = time.monotonic() + 180
        while (job := service.job(job_id))["state"] not in ("succeeded", "failed", "cancelled"):
            assert time.monotonic() < deadline, job
            time.sleep(0.5)
    finally:
        service.stop()
    assert job["state"] == "failed" and job["attempts"] == 1, job
    assert job["error"].splitlines() == [job["error"]]
    assert "environment error" in job["error"] and "ModuleNotFoundError: No module named 'torch'" in job["error"]
    assert not any("checkpoint" in e["reason"] for e in job["events"])
