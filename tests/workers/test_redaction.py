"""Credentials inside URLs and query strings (workers.redaction), and S3 keys kept out of a sweep driver's
environment while Tune runs (workers.storage.ray_fs.keys_out_of_environment)."""

from __future__ import annotations

import os
import stat

import pytest

from jobs.ray_train import job_environment
from services.dispatcher import redact, secret_values
from services.settings import SettingsError, check_no_url_credentials
from workers.redaction import redact_urls, url_passwords, without_url_credentials
from workers.storage import S3Connection
from workers.storage.ray_fs import TUNE_COPIED_CREDENTIALS, keys_out_of_environment

PASSWORD = "hunter2-mlflow-pw"
URI = f"http://alice:{PASSWORD}@mlflow.example:5000/"


@pytest.mark.parametrize(
    "text,expected",
    [
        (f"MLFLOW_TRACKING_URI={URI}", "MLFLOW_TRACKING_URI=http://alice:***@mlflow.example:5000/"),
        ("postgresql://u:p@ss@db/x and s3://bucket/key", "postgresql://u:***@db/x and s3://bucket/key"),
        ('"GET /jobs/j/logs?follow=true&token=tok-123 HTTP/1.1"', '"GET /jobs/j/logs?follow=true&token=*** HTTP/1.1"'),
        ("https://b.s3/k?X-Amz-Signature=abc&x=1", "https://b.s3/k?X-Amz-Signature=***&x=1"),
        ("http://host:8080/path and http://user@host/", "http://host:8080/path and http://user@host/"),
    ],
)
def test_url_credentials_are_masked(text, expected):
    assert redact_urls(text) == expected


def test_a_url_password_is_masked_also_where_it_shows_alone():
    env = {"MLFLOW_TRACKING_URI": URI}
    assert url_passwords(env.values()) == [PASSWORD]
    assert PASSWORD in secret_values(env)
    assert redact(f"auth failed with {PASSWORD}", secret_values(env)) == "auth failed with ***"
    assert without_url_credentials(URI) == "http://mlflow.example:5000/"


def test_a_job_is_given_urls_without_their_credentials():
    env = job_environment({"MLFLOW_TRACKING_URI": URI, "AEFORGE_HOME": "/tmp/x", "AWS_SECRET_ACCESS_KEY": "k" * 8})
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow.example:5000/"
    assert PASSWORD not in repr(env) and "AWS_SECRET_ACCESS_KEY" not in env


def test_the_service_refuses_a_password_in_mlflow_tracking_uri_with_advice(tmp_path):
    with pytest.raises(SettingsError) as refused:
        check_no_url_credentials({"AEFORGE_HOME": str(tmp_path), "MLFLOW_TRACKING_URI": URI})
    message = str(refused.value)
    assert PASSWORD not in message and "MLFLOW_TRACKING_PASSWORD" in message and "MLFLOW_TRACKING_URI" in message
    check_no_url_credentials({"AEFORGE_HOME": str(tmp_path), "MLFLOW_TRACKING_URI": "http://mlflow.example:5000"})


def test_a_sweep_driver_holds_no_s3_key_in_its_environment_while_tune_runs(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "node-key-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "node-secret-key-4242")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "node-session-token")
    monkeypatch.delenv("AEFORGE_S3_CREDENTIALS_FILE", raising=False)
    with keys_out_of_environment():
        # What Ray Tune's actor class cache would copy into each trial's runtime env: nothing.
        assert not [name for name in TUNE_COPIED_CREDENTIALS if name in os.environ]
        path = os.environ["AEFORGE_S3_CREDENTIALS_FILE"]
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        connection = S3Connection.from_settings()  # this process still signs with the same keys
        assert (connection.access_key_id, connection.secret_access_key, connection.session_token) == (
            "node-key-id",
            "node-secret-key-4242",
            "node-session-token",
        )
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == "node-secret-key-4242"
    assert "AEFORGE_S3_CREDENTIALS_FILE" not in os.environ and not os.path.exists(path)
