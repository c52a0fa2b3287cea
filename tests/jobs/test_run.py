"""The queue's entry point, `python -m jobs.run <job id>`: what its exit code tells the queue (2: the spec or its
data is wrong, do not retry; 1: anything else, such as storage that does not answer, retried after a back-off)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.s3 import free_port

REPO = Path(__file__).resolve().parents[2]


def run_entry_point(tmp_path: Path, spec: dict | str, **env: str) -> subprocess.CompletedProcess:
    text = spec if isinstance(spec, str) else json.dumps(spec)
    environ = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "AEFORGE_HOME": str(tmp_path / "home"),
        "AEFORGE_JOB_SPEC": text,
        "PYTHONPATH": str(REPO),
        **env,
    }
    return subprocess.run(
        [sys.executable, "-m", "jobs.run", "job-1"],
        cwd=tmp_path,
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_spec_the_queue_stored_wrongly_exits_2(tmp_path):
    done = run_entry_point(tmp_path, "name: not-json")
    assert done.returncode == 2 and "the stored spec is not valid JSON" in done.stderr


def test_missing_data_exits_2_with_the_field_named(tmp_path):
    spec = {"name": "missing-data", "data": {"source": str(tmp_path / "nope.npz")}, "train": {"steps": 2}}
    done = run_entry_point(tmp_path, spec)
    assert done.returncode == 2, done.stderr
    assert "data.source" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.timeout(120)
def test_storage_that_does_not_answer_exits_1_so_the_queue_retries(tmp_path):
    spec = {"name": "outage", "data": {"source": "builtin:dsprites", "limit": 64}, "train": {"steps": 2}}
    done = run_entry_point(
        tmp_path,
        spec,
        AEFORGE_STORAGE="s3://bucket/prefix",
        AEFORGE_S3_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}",
        AEFORGE_STORAGE_WAIT_S="2",
        AWS_ACCESS_KEY_ID="k",
        AWS_SECRET_ACCESS_KEY="s",
    )
    assert done.returncode == 1, done.stderr
    assert "StorageUnreachable" in done.stderr and "still unreachable after 2 s" in done.stderr
    assert "trying again in" in done.stdout
