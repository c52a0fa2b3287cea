"""AEFORGE_LOG_FORMAT: text by default, one JSON object per line with the job's fields; secrets masked in both."""

from __future__ import annotations

import io
import json
import logging

import pytest

from services.dispatcher import Dispatcher
from services.logs import JsonFormatter, TextFormatter, log_format
from services.settings import SettingsError
from services.store import Store
from tests.services.fakes import FakeCluster, FakeLauncher
from tests.services.test_store import submit

SECRET = "s3cr3t-value-for-the-log-test"


@pytest.fixture
def captured(monkeypatch):
    """The service's loggers written through both formatters into two buffers."""
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    buffers = {"json": io.StringIO(), "text": io.StringIO()}
    handlers = []
    for name, formatter in (("json", JsonFormatter()), ("text", TextFormatter())):
        handler = logging.StreamHandler(buffers[name])
        handler.setFormatter(formatter)
        handlers.append(handler)
    logger = logging.getLogger("services")
    old_level = logger.level
    logger.setLevel(logging.INFO)
    for handler in handlers:
        logger.addHandler(handler)
    try:
        yield buffers
    finally:
        for handler in handlers:
            logger.removeHandler(handler)
        logger.setLevel(old_level)


def test_json_lines_carry_the_job_fields_and_no_secret(tmp_path, captured):
    store = Store(f"sqlite:///{tmp_path / 'logs.db'}")
    launcher = FakeLauncher()
    dispatcher = Dispatcher(store, FakeCluster({"CPU": 4.0}), launcher)
    job = submit(store, owner="carol")
    dispatcher.tick()
    started = store.get(job.id)
    launcher.set(started.ray_submission_id, "FAILED", message=f"boom with {SECRET} in it")
    dispatcher.tick()
    store.close()

    lines = [json.loads(line) for line in captured["json"].getvalue().splitlines()]
    about_job = [line for line in lines if line.get("job_id") == job.id]
    assert len(about_job) >= 2, lines
    submitted = next(line for line in about_job if "submitted to Ray" in line["message"])
    assert submitted["owner"] == "carol" and submitted["attempt"] == 1
    assert submitted["ray_submission_id"] == started.ray_submission_id
    assert {"time", "level", "logger", "message"} <= set(submitted) and submitted["time"].endswith("Z")
    requeued = next(line for line in about_job if "-> queued" in line["message"])
    assert requeued["attempt"] == 1 and requeued["level"] == "INFO"
    for text in captured.values():
        assert SECRET not in text.getvalue()
    assert "boom with *** in it" in captured["text"].getvalue()


def test_the_log_format_setting():
    assert log_format({}) == "text" and log_format({"AEFORGE_LOG_FORMAT": "JSON"}) == "json"
    with pytest.raises(SettingsError, match="AEFORGE_LOG_FORMAT: 'xml' is not a log format"):
        log_format({"AEFORGE_LOG_FORMAT": "xml"})


def test_an_exception_is_one_json_line():
    record = logging.LogRecord("services.x", logging.ERROR, __file__, 1, "pass failed: %s", ("db",), None)
    try:
        raise RuntimeError("database gone")
    except RuntimeError:
        import sys

        record.exc_info = sys.exc_info()
    line = JsonFormatter().format(record)
    assert "\n" not in line
    parsed = json.loads(line)
    assert parsed["message"] == "pass failed: db" and "RuntimeError: database gone" in parsed["exception"]
