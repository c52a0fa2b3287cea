"""`aeforge run` against a Ray cluster that uses token authentication, without the token setting: one line naming
the setting and where the token goes, in seconds, instead of 20 retry lines and a traceback."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.fixtures.ray_head import ray_head_process

pytestmark = [pytest.mark.ray, pytest.mark.timeout(180)]

REPO = Path(__file__).resolve().parents[2]
SPEC = """name: auth-check
model: {variant: vae, architecture: mlp, latent_dim: 2}
data: {source: 'builtin:dsprites', limit: 256}
train: {steps: 2, batch_size: 16}
"""


@pytest.fixture(scope="module")
def token_auth_head():
    """A Ray head with RAY_AUTH_MODE=token (its token in a file of its own), stopped at the end."""
    token_dir = tempfile.mkdtemp(prefix="aeauth-token-", dir="/tmp")
    token_file = Path(token_dir) / "token"
    token_file.write_text(secrets.token_hex(16))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file), "RAY_USAGE_STATS_ENABLED": "0"}
    try:
        with ray_head_process(env, num_cpus=1, dashboard=False, prefix="aeauth-") as head:
            gcs = int(head.address.rsplit(":", 1)[1])
            deadline = time.monotonic() + 90
            while True:
                assert head.proc.poll() is None, head.log_path.read_text()[-3000:]
                try:
                    socket.create_connection(("127.0.0.1", gcs), timeout=1).close()
                    break
                except OSError:
                    assert time.monotonic() < deadline, "the Ray head did not open its GCS port"
                    time.sleep(0.5)
            yield head.address, token_file
    finally:
        shutil.rmtree(token_dir, ignore_errors=True)


def aeforge_run(tmp_path: Path, address: str, **env_extra: str) -> tuple[subprocess.CompletedProcess, float]:
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AEFORGE_", "MLFLOW_"))}
    env |= {"RAY_ADDRESS": address, "AEFORGE_HOME": str(tmp_path / "home"), "COLUMNS": "300", **env_extra}
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "services.cli", "run", str(spec)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return done, time.perf_counter() - started


def test_a_cluster_with_token_auth_and_no_token_setting_gets_one_clear_line(token_auth_head, tmp_path):
    address, _ = token_auth_head
    done, seconds = aeforge_run(tmp_path, address)
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    errors = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(errors) == 1, output
    assert "uses token authentication" in errors[0] and "RAY_AUTH_MODE=token" in errors[0]
    assert str(Path.home() / ".ray" / "auth_token") in errors[0]
    assert "Traceback" not in output and "gcs_client" not in output
    assert seconds < 30, seconds


def test_a_wrong_token_is_named_as_such(token_auth_head, tmp_path):
    address, _ = token_auth_head
    wrong = tmp_path / "wrong-token"
    wrong.write_text(secrets.token_hex(16))
    done, _ = aeforge_run(tmp_path, address, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(wrong))
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"refused the token in {wrong}" in " ".join(done.stderr.split())
