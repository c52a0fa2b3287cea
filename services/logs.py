"""The service's log lines: plain text by default, one JSON object per line with AEFORGE_LOG_FORMAT=json.

A line about a job carries its id, owner, attempt and Ray submission id as fields (``extra=job_fields(job)``), so
a log store can search them (``job_id = "vae-..."``) instead of parsing the text. Every line, text or JSON, passes
through masking of this process's secret values first: a secret that
reached a message (an exception from a library that printed its URL with a key in it) is not written out.
The same masking (:func:`redact`) keeps secrets out of what the dispatcher stores from Ray.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from workers.redaction import environment_url_passwords, redact_urls

LOG_FORMATS = ("text", "json")
# The fields a job's lines carry (LogRecord attributes set through ``extra``).
JOB_FIELDS = ("job_id", "owner", "attempt", "ray_submission_id")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def job_fields(job: Any) -> dict[str, Any]:
    """``extra=`` for a line about ``job`` (a services.store.Job)."""
    return {
        "job_id": job.id,
        "owner": job.owner,
        "attempt": job.attempts,
        "ray_submission_id": job.ray_submission_id,
    }


def log_format(environ: dict[str, str] | None = None) -> str:
    """AEFORGE_LOG_FORMAT (text or json; default text); anything else is a SettingsError naming the variable."""
    from services.settings import SettingsError

    value = (os.environ if environ is None else environ).get("AEFORGE_LOG_FORMAT", "").strip().lower() or "text"
    if value not in LOG_FORMATS:
        raise SettingsError(f"AEFORGE_LOG_FORMAT: {value!r} is not a log format; use text or json")
    return value


def secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of this process's secret variables, longest first (so a secret inside another is masked whole)."""
    from workers.settings import SECRET_ENV_VARS

    env = os.environ if environ is None else environ
    names = (*SECRET_ENV_VARS, "AEFORGE_API_TOKEN", "AEFORGE_TOKENS")
    values = [env[n] for n in names if len(env.get(n) or "") >= 4]
    # A password inside a URL setting (MLFLOW_TRACKING_URI, AEFORGE_DB_URL, ...) is masked also where it shows alone.
    values += [p for p in environment_url_passwords(env) if len(p) >= 4]
    return sorted(set(values), key=len, reverse=True)


def redact(text: str, secrets: list[str] | None = None) -> str:
    """``text`` with this process's secret values, every URL's password and secret query values masked."""
    for value in secret_values() if secrets is None else secrets:
        text = text.replace(value, "***")
    return redact_urls(text)


class RedactingFilter(logging.Filter):
    """Masks secrets in a log record before a handler writes it: this process's secret values, URL passwords and
    secret query values (the access log's `GET /jobs/x/logs?token=...`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        secrets = secret_values()  # once per record: it reads the whole environment (an access line each request)
        if redact(message, secrets) == message:
            return True
        # Each argument masked in place: formatters may read the arguments themselves (uvicorn's access log does).
        if isinstance(record.args, tuple):
            record.args = tuple(redact(a, secrets) if isinstance(a, str) else a for a in record.args)
        if isinstance(record.msg, str):
            record.msg = redact(record.msg, secrets)
        # A secret split across arguments: the whole line.
        if redact(record.getMessage(), secrets) != record.getMessage():
            record.msg, record.args = redact(message, secrets), None
        return True


class _Redacting:
    def redact(self, text: str) -> str:
        return redact(text)


class TextFormatter(_Redacting, logging.Formatter):
    def __init__(self):
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        return self.redact(super().format(record))


class JsonFormatter(_Redacting, logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601), level, logger, message, the job fields when the record has
    them, and the exception's traceback as text."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": self.redact(record.getMessage()),
        }
        for name in JOB_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                out[name] = value
        if record.exc_info:
            out["exception"] = self.redact(self.formatException(record.exc_info))
        return json.dumps(out, ensure_ascii=False, default=str)


class CurrentStderrHandler(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is when a record is emitted, not as it was when logging was configured: a
    caller that swaps stderr for a while (a test's CLI runner, a daemonising wrapper) and closes its stand-in would
    otherwise leave every later record failing with "--- Logging error ---" on the real stderr."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass  # always the current sys.stderr


def configure_logging(level: int = logging.INFO, environ: dict[str, str] | None = None) -> str:
    """The root logger writes to stderr in the format AEFORGE_LOG_FORMAT names; returns that format. Uvicorn's
    loggers are left to propagate here (``uvicorn_log_config``), so its lines are in the same format."""
    fmt = log_format(environ)
    handler = CurrentStderrHandler()
    handler.addFilter(RedactingFilter())  # masks the record's arguments too: a formatter may read them itself
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    return fmt


def uvicorn_log_config() -> dict[str, Any]:
    """Uvicorn's logging: its loggers send their lines to the root handler (configure_logging) at INFO."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "loggers": {
            name: {"handlers": [], "level": "INFO", "propagate": True}
            for name in ("uvicorn", "uvicorn.error", "uvicorn.access")
        },
    }
