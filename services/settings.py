"""Settings of the queue service and its client, from the environment or a settings file.

A settings file (YAML mapping of the same variable names) is read from AEFORGE_SETTINGS_FILE, else from
AEFORGE_HOME/settings.yaml when that exists; a variable set in the environment wins over the file.

API tokens come from AEFORGE_TOKENS_FILE (a YAML/JSON list of {token_hash, owner, role}), from AEFORGE_TOKENS (the
same list inline, or ``token:owner:role`` entries separated by commas), or from AEFORGE_HOME/tokens.yaml, the file
``aeforge serve`` writes on first start. A token file holds hashes, ``sha256:<hex>`` of each token (the tokens are
32 random bytes, so a fast hash is enough), compared in constant time against every entry; a plain ``token`` entry
is still read (older files, AEFORGE_TOKENS), but every file aeforge writes (``aeforge serve``, ``aeforge tokens
add``) holds hashes only. A token file is read again when it changes, so a token added to it works at once. The CLI
on the machine of an ``aeforge serve`` finds its admin token in AEFORGE_HOME/client-token (mode 0600), written next
to the hash. Tokens never appear in reprs, logs or the job table.

The CLI finds the service at AEFORGE_API_URL; without it, at the address a running ``aeforge serve`` recorded in
AEFORGE_HOME/service.json (its URL, process id and host, written when it starts listening and removed when it
stops); without either, at http://127.0.0.1:8000. A record whose process has exited is ignored, and the client's
"cannot reach" message says so.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import hmac
import json
import logging
import math
import os
import re
import secrets
import socket
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, overload
from urllib.parse import urlparse

import yaml

from workers.errors import AeforgeError
from workers.settings import CREDENTIAL_ENV_VARS, STORAGE_ENV_VARS

log = logging.getLogger(__name__)

Role = Literal["user", "admin"]
ROLES = ("user", "admin")

# Every variable a settings file may set (the job-side ones are passed through to jobs; see workers.settings).
KNOWN_VARIABLES = (
    "AEFORGE_HOME",
    "AEFORGE_API_WORKERS",
    "AEFORGE_DB_URL",
    "AEFORGE_API_URL",
    "AEFORGE_API_TOKEN",
    "AEFORGE_TOKENS_FILE",
    "AEFORGE_TOKENS",
    "AEFORGE_MAX_CONCURRENT_JOBS",
    "AEFORGE_MAX_REQUEST_BYTES",
    "AEFORGE_MAX_ATTEMPTS",
    "AEFORGE_DISPATCH_INTERVAL",
    "AEFORGE_RETRY_BACKOFF_S",
    "AEFORGE_JOB_MODULE",
    "AEFORGE_JOB_PYTHON",
    "AEFORGE_ALLOWED_DATA_PREFIXES",
    "AEFORGE_POLICY_FILE",
    "AEFORGE_RETENTION_DAYS",
    "AEFORGE_RETENTION_ARCHIVE_DIR",
    "AEFORGE_AUTOSCALER_ADDRESS",
    "RAY_ADDRESS",
    *STORAGE_ENV_VARS,
    *CREDENTIAL_ENV_VARS,
)

DEFAULT_API_URL = "http://127.0.0.1:8000"
DEFAULT_MAX_REQUEST_BYTES = 1 << 20
DEFAULT_MAX_ATTEMPTS = 3
# The first retry of a failed attempt waits this long, the second twice as long, and so on (plus jitter).
DEFAULT_RETRY_BACKOFF_S = 10.0
MIN_TOKEN_LENGTH = 8
HASH_PREFIX = "sha256:"
HASH_PATTERN = re.compile(r"^sha256:[0-9a-f]{64}$")
MODULE_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


class SettingsError(AeforgeError):
    """A setting with a value that cannot be used; the message names the variable or file."""


def hash_token(token: str) -> str:
    """``sha256:<hex>`` of an API token: what a token file keeps."""
    return HASH_PREFIX + hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True)
class Principal:
    """Who an API token belongs to: its hash, and the token itself only where it was given in plain (AEFORGE_TOKENS,
    an older token file, a token just made)."""

    owner: str
    role: Role
    token: str | None = field(default=None, repr=False, compare=False)
    token_hash: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        if not self.token_hash:
            if not self.token:
                raise ValueError("a Principal needs its token or its token_hash")
            object.__setattr__(self, "token_hash", hash_token(self.token))

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def entry(self) -> dict[str, str]:
        """Its entry in a token file: the hash, never the token."""
        return {"token_hash": self.token_hash, "owner": self.owner, "role": self.role}


@dataclass(frozen=True)
class ServiceSettings:
    home: Path
    db_url: str
    api_url: str = DEFAULT_API_URL
    api_token: str | None = field(default=None, repr=False)
    tokens: tuple[Principal, ...] = field(default=(), repr=False)
    ray_address: str | None = None
    max_concurrent_jobs: int | None = None
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    dispatch_interval_s: float = 1.0
    retry_backoff_s: float = DEFAULT_RETRY_BACKOFF_S
    job_module: str = "jobs.run"
    # The interpreter of the jobs' entry point (`<job_python> -m <job_module> <id>`) on the cluster's nodes. Unset:
    # the embedded head's jobs run with the service's own interpreter, a cluster's with the `python` on its PATH.
    job_python: str | None = None
    tokens_file: Path | None = None  # where ``tokens`` were read from: read again when it changes
    # Local paths and s3:// URLs a user's job may read (services.access); admins read anything.
    allowed_data_prefixes: tuple[str, ...] = ()
    # Where api_url came from, for the client's "cannot reach" message (see api_url_for).
    api_url_source: str = "the default"
    # The queue policy (teams, quotas, priority classes: services.policy); None: the default policy.
    policy_file: Path | None = None
    # Finished jobs (and their events) older than this many days are deleted by the service; None: kept forever.
    retention_days: float | None = None
    # Where retention appends what it deletes (JSON lines per day); None: deleted without an archive.
    retention_archive_dir: Path | None = None
    # The Ray cluster (GCS address, host:6379) whose autoscaler the dispatcher tells what the queue needs; None: a
    # cluster of fixed size (then a job bigger than the whole cluster is refused rather than waited for).
    autoscaler_address: str | None = None
    # API processes on the service's port (services.api.ServiceWorkers); 1: the API and dispatcher in one process.
    api_workers: int = 1

    @classmethod
    def load(cls, environ: Mapping[str, str] | None = None) -> ServiceSettings:
        """Settings from ``environ`` (default os.environ) over the settings file."""
        env = dict(os.environ if environ is None else environ)
        values = _file_values(env) | {k: v for k, v in env.items() if k in KNOWN_VARIABLES and v != ""}
        home = Path(values.get("AEFORGE_HOME", ".aeforge")).expanduser().resolve()
        db_url = values.get("AEFORGE_DB_URL") or f"sqlite:///{home / 'aeforge.db'}"
        api_url, api_url_source = api_url_for(values.get("AEFORGE_API_URL"), home)
        if urlparse(api_url).scheme not in ("http", "https"):
            raise SettingsError(f"AEFORGE_API_URL must be an http:// or https:// URL, got {api_url!r}")
        job_module = values.get("AEFORGE_JOB_MODULE", "jobs.run")
        if not MODULE_PATTERN.match(job_module):
            raise SettingsError(f"AEFORGE_JOB_MODULE must be a dotted Python module name, got {job_module!r}")
        job_python = values.get("AEFORGE_JOB_PYTHON")
        if job_python is not None and (job_python != job_python.strip() or not job_python.isprintable()):
            raise SettingsError(
                f"AEFORGE_JOB_PYTHON must be the path or name of a Python interpreter on the cluster's nodes, "
                f"got {job_python!r}"
            )
        return cls(
            home=home,
            db_url=db_url,
            api_url=api_url,
            api_url_source=api_url_source,
            api_token=values.get("AEFORGE_API_TOKEN"),
            tokens=_load_tokens(values, home),
            tokens_file=_tokens_file(values, home),
            ray_address=values.get("RAY_ADDRESS"),
            max_concurrent_jobs=_positive_int(values, "AEFORGE_MAX_CONCURRENT_JOBS", None),
            max_request_bytes=_positive_int(values, "AEFORGE_MAX_REQUEST_BYTES", DEFAULT_MAX_REQUEST_BYTES),
            max_attempts=_positive_int(values, "AEFORGE_MAX_ATTEMPTS", DEFAULT_MAX_ATTEMPTS),
            dispatch_interval_s=_positive_float(values, "AEFORGE_DISPATCH_INTERVAL", 1.0),
            retry_backoff_s=_positive_float(values, "AEFORGE_RETRY_BACKOFF_S", DEFAULT_RETRY_BACKOFF_S),
            job_module=job_module,
            job_python=job_python,
            allowed_data_prefixes=_data_prefixes(values.get("AEFORGE_ALLOWED_DATA_PREFIXES", "")),
            policy_file=_policy_file(values),
            retention_days=_positive_float(values, "AEFORGE_RETENTION_DAYS", 0.0) or None,
            retention_archive_dir=(
                Path(values["AEFORGE_RETENTION_ARCHIVE_DIR"]).expanduser()
                if values.get("AEFORGE_RETENTION_ARCHIVE_DIR")
                else None
            ),
            autoscaler_address=values.get("AEFORGE_AUTOSCALER_ADDRESS") or None,
            api_workers=_positive_int(values, "AEFORGE_API_WORKERS", 1),
        )

    def job_interpreter(self) -> str:
        """The interpreter of the jobs' entry point: AEFORGE_JOB_PYTHON; else, for the embedded head (no
        RAY_ADDRESS), the interpreter that runs this service, whatever PATH says (a venv that is not activated);
        else `python` on the cluster's PATH."""
        if self.job_python:
            return self.job_python
        if self.ray_address is None and sys.executable:
            return sys.executable
        return "python"

    def current_tokens(self) -> tuple[Principal, ...]:
        """The tokens: those of ``tokens_file`` as it is now (read again when it changed; if it cannot be read,
        the last ones that could, with a warning), else those given."""
        return _TOKEN_FILES.current(self.tokens_file, self.tokens) if self.tokens_file else self.tokens

    def principal_for(self, token: str) -> Principal | None:
        """The token's owner: its hash compared in constant time against every configured token's."""
        presented, found = hash_token(token).encode(), None
        for principal in self.current_tokens():
            if hmac.compare_digest(principal.token_hash.encode(), presented):
                found = principal
        return found

    def client_token(self) -> str | None:
        """AEFORGE_API_TOKEN, else (for a service on this machine) the admin token ``aeforge serve`` wrote for this
        user (AEFORGE_HOME/client-token), else an admin token given in plain."""
        if self.api_token:
            return self.api_token
        if urlparse(self.api_url).hostname in ("127.0.0.1", "localhost", "::1"):
            with contextlib.suppress(OSError, UnicodeDecodeError):
                token = local_client_token_path(self.home).read_text().strip()
                if token:
                    return token
            for principal in self.tokens:
                if principal.is_admin and principal.token:
                    return principal.token
        return None


def service_record_path(home: Path) -> Path:
    """Where a running ``aeforge serve`` records its address for the CLI: AEFORGE_HOME/service.json."""
    return home / "service.json"


def url_for_listener(host: str, port: int) -> str:
    """The URL a client on this machine uses for a server listening on ``host``:``port`` (a wildcard address is
    reached on loopback)."""
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def write_service_record(home: Path, url: str, pid: int | None = None) -> Path:
    """Record that this process serves the API at ``url`` (all or nothing: a reader never sees half a file)."""
    home.mkdir(parents=True, exist_ok=True)
    path = service_record_path(home)
    record = {"url": url, "pid": os.getpid() if pid is None else pid, "host": socket.gethostname()}
    write_private(path, json.dumps(record) + "\n")
    return path


def remove_service_record(home: Path, pid: int | None = None) -> None:
    """Remove the record at a clean stop, if it is still this process's (a newer service may have replaced it)."""
    path = service_record_path(home)
    record = read_service_record(home)
    if record is not None and record.get("pid") == (os.getpid() if pid is None else pid):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def read_service_record(home: Path) -> dict[str, Any] | None:
    """The record in AEFORGE_HOME/service.json, or None when there is none or it is not one (then it is ignored)."""
    try:
        record = json.loads(service_record_path(home).read_text())
    except (OSError, ValueError):
        return None
    if not (isinstance(record, dict) and isinstance(record.get("url"), str) and isinstance(record.get("pid"), int)):
        return None
    return record


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    except (OSError, OverflowError, ValueError):
        return False
    return True


def api_url_for(explicit: str | None, home: Path) -> tuple[str, str]:
    """The service URL and where it came from: AEFORGE_API_URL when set; else the address in AEFORGE_HOME/
    service.json when that service's process is alive on this host; else the default, saying why a record there
    was passed over."""
    if explicit:
        return explicit.rstrip("/"), "AEFORGE_API_URL"
    record = read_service_record(home)
    path = service_record_path(home)
    if record is None:
        return DEFAULT_API_URL, f"the default (no AEFORGE_API_URL, and no running `aeforge serve` recorded in {path})"
    url, pid, host = record["url"].rstrip("/"), record["pid"], record.get("host")
    if host not in (None, socket.gethostname()):
        return DEFAULT_API_URL, (
            f"the default ({path} is the record of a service on host {host}, not this one; set AEFORGE_API_URL)"
        )
    if not process_alive(pid):
        return DEFAULT_API_URL, (
            f"the default ({path} names {url}, but its process {pid} has exited: a stale "
            f"record of an `aeforge serve` that did not stop cleanly)"
        )
    return url, f"{path} (written by `aeforge serve`, process {pid})"


def local_tokens_path(home: Path) -> Path:
    return home / "tokens.yaml"


def local_client_token_path(home: Path) -> Path:
    """The local CLI's copy of the admin token of an ``aeforge serve`` on this machine (mode 0600)."""
    return home / "client-token"


def write_local_admin_token(home: Path) -> Principal:
    """First start of an embedded service without tokens: one admin token for this machine's user, its hash in
    AEFORGE_HOME/tokens.yaml and the token itself in AEFORGE_HOME/client-token for the CLI (both mode 0600)."""
    home.mkdir(parents=True, exist_ok=True)
    path = local_tokens_path(home)
    token = secrets.token_urlsafe(32)
    principal = Principal(owner=getpass.getuser(), role="admin", token=token)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        write_private(local_client_token_path(home), token + "\n")
        yaml.safe_dump([principal.entry()], fh, sort_keys=False)
    return principal


def write_private(path: Path, text: str) -> None:
    """``text`` to ``path`` (mode 0600), all or nothing: written beside it, then renamed into place."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def tokens_file_for(environ: Mapping[str, str] | None = None) -> Path:
    """The token file that ``aeforge tokens add`` writes, the one the service reads: AEFORGE_TOKENS_FILE, else
    AEFORGE_HOME/tokens.yaml (SettingsError when AEFORGE_TOKENS is set, which the service reads instead)."""
    env = dict(os.environ if environ is None else environ)
    values = _file_values(env) | {k: v for k, v in env.items() if k in KNOWN_VARIABLES and v != ""}
    home = Path(values.get("AEFORGE_HOME", ".aeforge")).expanduser().resolve()
    if not values.get("AEFORGE_TOKENS_FILE") and values.get("AEFORGE_TOKENS"):
        raise SettingsError(
            "AEFORGE_TOKENS is set, so the service reads its tokens from that variable, not from a "
            "file: set AEFORGE_TOKENS_FILE (and unset AEFORGE_TOKENS) to manage tokens with aeforge"
        )
    path = _tokens_file(values, home, existing_only=False)
    assert path is not None, "only AEFORGE_TOKENS without AEFORGE_TOKENS_FILE gives no file, refused above"
    return path


def check_owner_name(owner: str, role: Role) -> None:
    """An owner is named as a model is (jobs.spec.NAME_PATTERN: it lands in paths, tags and log lines), and only an
    admin token may belong to an owner called 'admin' (a user named so would pass for one in every listing)."""
    from jobs.spec import NAME_PATTERN

    if not isinstance(owner, str) or not re.fullmatch(NAME_PATTERN, owner):
        raise SettingsError(
            f"owner {owner!r}: use 1-100 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    if role != "admin" and owner.lower() == "admin":
        raise SettingsError("owner 'admin' is kept for admin tokens: give a user token another owner name")


def add_token(path: Path, owner: str, role: Role = "user") -> Principal:
    """A new random token for ``owner`` with ``role``, its hash appended to the token file ``path`` (made, mode
    0600, if missing); the returned Principal carries the token, which is nowhere else. Plain entries already in
    the file are rewritten as hashes (for the local AEFORGE_HOME/tokens.yaml of an older aeforge, its admin token
    is kept for the local CLI in client-token first)."""
    if role not in ROLES:
        raise SettingsError(f"role must be 'user' or 'admin', got {role!r}")
    check_owner_name(owner, role)
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    import fcntl

    with open(path.with_name(f".{path.name}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two adds at once: both entries land
        existing = parse_tokens(_read(path), str(path)) if path.exists() else ()
        client = local_client_token_path(path.parent)
        if path.name == "tokens.yaml" and not client.exists():
            plain_admin = next((p.token for p in existing if p.is_admin and p.token), None)
            if plain_admin:
                write_private(client, plain_admin + "\n")
        principal = Principal(owner=owner, role=role, token=secrets.token_urlsafe(32))
        write_private(path, yaml.safe_dump([p.entry() for p in (*existing, principal)], sort_keys=False))
    return principal


class _TokenFiles:
    """The tokens of each token file, read again when the file changes (by stat), for every request's check."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: dict[Path, tuple[tuple[int, int, int] | None, tuple[Principal, ...]]] = {}

    def current(self, path: Path, fallback: tuple[Principal, ...]) -> tuple[Principal, ...]:
        try:
            st = path.stat()
            stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        except OSError:
            stamp = None
        with self._lock:
            seen = self._seen.get(path)
            if seen is not None and seen[0] == stamp:
                return seen[1]
            try:
                tokens = parse_tokens(_read(path), str(path))
            except SettingsError as exc:
                tokens = seen[1] if seen is not None else fallback
                log.warning("%s; still using the %d token(s) read before", exc, len(tokens))
            self._seen[path] = (stamp, tokens)
            return tokens


_TOKEN_FILES = _TokenFiles()


def _file_values(env: Mapping[str, str]) -> dict[str, str]:
    explicit = env.get("AEFORGE_SETTINGS_FILE")
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise SettingsError(f"AEFORGE_SETTINGS_FILE: no such file: {path}")
    else:
        path = Path(env.get("AEFORGE_HOME", ".aeforge")).expanduser() / "settings.yaml"
        if not path.is_file():
            return {}
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise SettingsError(f"{path}: cannot read the settings file: {exc}") from None
    if not isinstance(data, dict):
        raise SettingsError(f"{path}: a settings file is a mapping of variable names to values")
    unknown = sorted(set(data) - set(KNOWN_VARIABLES))
    if unknown:
        raise SettingsError(
            f"{path}: unknown setting(s) {', '.join(map(str, unknown))}; known: {', '.join(KNOWN_VARIABLES)}"
        )
    return {k: str(v) for k, v in data.items() if v is not None}


@overload
def _positive_int(values: Mapping[str, str], name: str, default: int) -> int: ...
@overload
def _positive_int(values: Mapping[str, str], name: str, default: None) -> int | None: ...
def _positive_int(values: Mapping[str, str], name: str, default: int | None) -> int | None:
    raw = values.get(name)
    if raw is None:
        return default
    try:
        number = int(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a positive integer, got {raw!r}") from None
    if number < 1:
        raise SettingsError(f"{name} must be a positive integer, got {raw!r}")
    return number


def _positive_float(values: Mapping[str, str], name: str, default: float) -> float:
    raw = values.get(name)
    if raw is None:
        return default
    try:
        number = float(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a positive number, got {raw!r}") from None
    if not (number > 0 and math.isfinite(number)):
        raise SettingsError(f"{name} must be a positive number, got {raw!r}")
    return number


def _tokens_file(values: Mapping[str, str], home: Path, existing_only: bool = True) -> Path | None:
    """The token file the service reads: AEFORGE_TOKENS_FILE, else AEFORGE_HOME/tokens.yaml unless AEFORGE_TOKENS
    is set (``existing_only``: if it is there); None when the tokens come from AEFORGE_TOKENS or nowhere."""
    if values.get("AEFORGE_TOKENS_FILE"):
        return Path(values["AEFORGE_TOKENS_FILE"]).expanduser()
    if values.get("AEFORGE_TOKENS"):
        return None
    local = local_tokens_path(home)
    return local if local.is_file() or not existing_only else None


def _policy_file(values: Mapping[str, str]) -> Path | None:
    raw = values.get("AEFORGE_POLICY_FILE")
    if not raw:
        return None
    path = Path(raw).expanduser()
    if not path.is_file():
        raise SettingsError(f"AEFORGE_POLICY_FILE: no such file: {path}")
    return path


def check_no_url_credentials(environ: Mapping[str, str] | None = None) -> None:
    """Refuse a password inside a URL that jobs are given (MLFLOW_TRACKING_URI, AEFORGE_S3_ENDPOINT_URL): a job
    gets its settings in its Ray runtime environment, in clear in `ray job list`, the dashboard and Ray's logs. The
    message says what to do instead and never repeats the password."""
    from workers.redaction import has_url_password, redact_urls

    env = dict(os.environ if environ is None else environ)
    values = _file_values(env) | {k: v for k, v in env.items() if v != ""}
    advice = {
        "MLFLOW_TRACKING_URI": "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) "
        "where the service and the Ray nodes run, and the URL without them",
        "AEFORGE_S3_ENDPOINT_URL": "give the S3 keys as AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or a credentials "
        "file) where the service and the Ray nodes run, and the endpoint without them",
    }
    for name, what in advice.items():
        value = values.get(name)
        if value and has_url_password(value):
            raise SettingsError(
                f"{name}={redact_urls(value)} holds a password; jobs are given this URL in their Ray runtime "
                f"environment, which Ray shows in clear: {what}"
            )


def _data_prefixes(raw: str) -> tuple[str, ...]:
    """AEFORGE_ALLOWED_DATA_PREFIXES: comma-separated ``file:///path`` and ``s3://bucket/prefix`` entries."""
    prefixes = tuple(p.strip() for p in raw.split(",") if p.strip())
    for p in prefixes:
        parsed = urlparse(p)
        local = parsed.scheme == "file" and parsed.netloc in ("", "localhost") and parsed.path.startswith("/")
        if not (local or (parsed.scheme == "s3" and parsed.netloc)):
            raise SettingsError(
                f"AEFORGE_ALLOWED_DATA_PREFIXES: {p!r} is neither file:///absolute/path nor s3://bucket/prefix"
            )
    return prefixes


def _load_tokens(values: Mapping[str, str], home: Path) -> tuple[Principal, ...]:
    if values.get("AEFORGE_TOKENS_FILE"):
        path = Path(values["AEFORGE_TOKENS_FILE"]).expanduser()
        if not path.is_file():
            raise SettingsError(f"AEFORGE_TOKENS_FILE: no such file: {path}")
        return parse_tokens(_read(path), str(path))
    if values.get("AEFORGE_TOKENS"):
        return parse_tokens(values["AEFORGE_TOKENS"], "AEFORGE_TOKENS")
    local = local_tokens_path(home)
    if local.is_file():
        return parse_tokens(_read(local), str(local))
    return ()


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise SettingsError(f"{path}: cannot read the token file: {exc}") from None


def parse_tokens(text: str, source: str) -> tuple[Principal, ...]:
    """A YAML/JSON list of {token_hash, owner, role} (or {token, owner, role}: a plain token, still read), or
    ``token:owner:role`` entries separated by commas. Errors name the entry, never a token."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        data = text
    if isinstance(data, str):
        data = [_compact_entry(part.strip(), source, i) for i, part in enumerate(data.split(",")) if part.strip()]
    if not isinstance(data, list):
        raise SettingsError(f"{source}: expected a list of {{token, owner, role}} entries")
    principals: list[Principal] = []
    seen: set[str] = set()
    for i, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise SettingsError(f"{source}: entry {i}: expected a mapping with token, owner and role")
        unknown = sorted(set(entry) - {"token", "token_hash", "owner", "role"})
        if unknown:
            raise SettingsError(f"{source}: entry {i}: unknown key(s) {', '.join(map(str, unknown))}")
        owner, role = str(entry.get("owner") or ""), entry.get("role", "user")
        if ("token" in entry) == ("token_hash" in entry):
            raise SettingsError(
                f"{source}: entry {i}: give token_hash (sha256:<hex> of the token) or token, "
                f"not {'both' if 'token' in entry else 'neither'}"
            )
        if "token_hash" in entry:
            token, token_hash = None, str(entry["token_hash"] or "").strip().lower()
            if not HASH_PATTERN.match(token_hash):
                raise SettingsError(
                    f"{source}: entry {i}: token_hash must be 'sha256:' and 64 hex digits "
                    f"(`aeforge tokens add` writes it)"
                )
        else:
            token = str(entry.get("token") or "")
            if len(token) < MIN_TOKEN_LENGTH:
                raise SettingsError(f"{source}: entry {i}: token must be at least {MIN_TOKEN_LENGTH} characters")
            token_hash = hash_token(token)
        if not owner or len(owner) > 100:
            raise SettingsError(f"{source}: entry {i}: owner must be 1 to 100 characters")
        if role not in ROLES:
            raise SettingsError(f"{source}: entry {i}: role must be 'user' or 'admin', got {role!r}")
        if token_hash in seen:
            raise SettingsError(f"{source}: entry {i}: the same token is listed twice")
        seen.add(token_hash)
        principals.append(Principal(owner=owner, role=role, token=token, token_hash=token_hash))
    return tuple(principals)


def _compact_entry(part: str, source: str, index: int) -> dict[str, Any]:
    pieces = part.split(":")
    if len(pieces) not in (2, 3):
        raise SettingsError(f"{source}: entry {index}: expected token:owner or token:owner:role")
    return {"token": pieces[0], "owner": pieces[1], "role": pieces[2] if len(pieces) == 3 else "user"}
