"""Settings of the queue service and its client, from the environment or a settings file.

A settings file (YAML mapping of the same variable names) is read from AEFORGE_SETTINGS_FILE, else from
AEFORGE_HOME/settings.yaml when that exists; a variable set in the environment wins over the file. API tokens
come from AEFORGE_TOKENS_FILE (a YAML/JSON list of {token, owner, role}), from AEFORGE_TOKENS (the same list
inline, or ``token:owner:role`` entries separated by commas), or from AEFORGE_HOME/tokens.yaml, the file
``aeforge serve`` writes on first start. Tokens never appear in reprs, logs or the job table.
"""

from __future__ import annotations

import getpass
import hmac
import math
import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Mapping
from urllib.parse import urlparse

import yaml

from workers.errors import AeforgeError
from workers.settings import STORAGE_ENV_VARS

Role = Literal["user", "admin"]
ROLES = ("user", "admin")

# Every variable a settings file may set (the job-side ones are passed through to jobs; see workers.settings).
KNOWN_VARIABLES = (
    "AEFORGE_HOME",
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
    "RAY_ADDRESS",
    *STORAGE_ENV_VARS,
)

DEFAULT_API_URL = "http://127.0.0.1:8000"
DEFAULT_MAX_REQUEST_BYTES = 1 << 20
DEFAULT_MAX_ATTEMPTS = 3
# The first retry of a failed attempt waits this long, the second twice as long, and so on (plus jitter).
DEFAULT_RETRY_BACKOFF_S = 10.0
MIN_TOKEN_LENGTH = 8
MODULE_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


class SettingsError(AeforgeError):
    """A setting with a value that cannot be used; the message names the variable or file."""


@dataclass(frozen=True)
class Principal:
    """Who an API token belongs to."""

    owner: str
    role: Role
    token: str = field(repr=False)

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


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

    @classmethod
    def load(cls, environ: Mapping[str, str] | None = None) -> "ServiceSettings":
        """Settings from ``environ`` (default os.environ) over the settings file."""
        env = dict(os.environ if environ is None else environ)
        values = _file_values(env) | {k: v for k, v in env.items() if k in KNOWN_VARIABLES and v != ""}
        home = Path(values.get("AEFORGE_HOME", ".aeforge")).expanduser().resolve()
        db_url = values.get("AEFORGE_DB_URL") or f"sqlite:///{home / 'aeforge.db'}"
        api_url = values.get("AEFORGE_API_URL", DEFAULT_API_URL).rstrip("/")
        if urlparse(api_url).scheme not in ("http", "https"):
            raise SettingsError(f"AEFORGE_API_URL must be an http:// or https:// URL, got {api_url!r}")
        job_module = values.get("AEFORGE_JOB_MODULE", "jobs.run")
        if not MODULE_PATTERN.match(job_module):
            raise SettingsError(f"AEFORGE_JOB_MODULE must be a dotted Python module name, got {job_module!r}")
        return cls(
            home=home,
            db_url=db_url,
            api_url=api_url,
            api_token=values.get("AEFORGE_API_TOKEN"),
            tokens=_load_tokens(values, home),
            ray_address=values.get("RAY_ADDRESS"),
            max_concurrent_jobs=_positive_int(values, "AEFORGE_MAX_CONCURRENT_JOBS", None),
            max_request_bytes=_positive_int(values, "AEFORGE_MAX_REQUEST_BYTES", DEFAULT_MAX_REQUEST_BYTES),
            max_attempts=_positive_int(values, "AEFORGE_MAX_ATTEMPTS", DEFAULT_MAX_ATTEMPTS),
            dispatch_interval_s=_positive_float(values, "AEFORGE_DISPATCH_INTERVAL", 1.0),
            retry_backoff_s=_positive_float(values, "AEFORGE_RETRY_BACKOFF_S", DEFAULT_RETRY_BACKOFF_S),
            job_module=job_module,
        )

    def principal_for(self, token: str) -> Principal | None:
        """The token's owner, compared in constant time against every configured token."""
        found = None
        for principal in self.tokens:
            if hmac.compare_digest(principal.token.encode(), token.encode()):
                found = principal
        return found

    def client_token(self) -> str | None:
        """AEFORGE_API_TOKEN, else (for a service on this machine) the admin token ``aeforge serve`` wrote."""
        if self.api_token:
            return self.api_token
        if urlparse(self.api_url).hostname in ("127.0.0.1", "localhost", "::1"):
            for principal in self.tokens:
                if principal.is_admin:
                    return principal.token
        return None


def local_tokens_path(home: Path) -> Path:
    return home / "tokens.yaml"


def write_local_admin_token(home: Path) -> Principal:
    """First start of an embedded service without tokens: one admin token for this machine's user (mode 0600)."""
    home.mkdir(parents=True, exist_ok=True)
    path = local_tokens_path(home)
    principal = Principal(owner=getpass.getuser(), role="admin", token=secrets.token_urlsafe(32))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        yaml.safe_dump([{"token": principal.token, "owner": principal.owner, "role": principal.role}], fh)
    return principal


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
        raise SettingsError(f"{path}: unknown setting(s) {', '.join(map(str, unknown))}; known: {', '.join(KNOWN_VARIABLES)}")
    return {k: str(v) for k, v in data.items() if v is not None}


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
    """A YAML/JSON list of {token, owner, role}, or ``token:owner:role`` entries separated by commas."""
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
        unknown = sorted(set(entry) - {"token", "owner", "role"})
        if unknown:
            raise SettingsError(f"{source}: entry {i}: unknown key(s) {', '.join(map(str, unknown))}")
        token, owner, role = str(entry.get("token") or ""), str(entry.get("owner") or ""), entry.get("role", "user")
        if len(token) < MIN_TOKEN_LENGTH:
            raise SettingsError(f"{source}: entry {i}: token must be at least {MIN_TOKEN_LENGTH} characters")
        if not owner or len(owner) > 100:
            raise SettingsError(f"{source}: entry {i}: owner must be 1 to 100 characters")
        if role not in ROLES:
            raise SettingsError(f"{source}: entry {i}: role must be 'user' or 'admin', got {role!r}")
        if token in seen:
            raise SettingsError(f"{source}: entry {i}: the same token is listed twice")
        seen.add(token)
        principals.append(Principal(owner=owner, role=role, token=token))
    return tuple(principals)


def _compact_entry(part: str, source: str, index: int) -> dict:
    pieces = part.split(":")
    if len(pieces) not in (2, 3):
        raise SettingsError(f"{source}: entry {index}: expected token:owner or token:owner:role")
    return {"token": pieces[0], "owner": pieces[1], "role": pieces[2] if len(pieces) == 3 else "user"}
