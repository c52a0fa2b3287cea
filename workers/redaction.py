"""Credentials inside text: a URL's password (``http://user:pass@host``) and a secret query parameter
(``?token=...``) are masked wherever the service writes or forwards text (its log, job errors, job logs, the API's
``/logs``), and stripped from what a job is given (a Ray job's runtime environment is in clear in `ray job list`)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from urllib.parse import urlsplit, urlunsplit

MASK = "***"
# scheme://user:password@ : the password runs to the last '@' before a '/' or a blank (a password should hold '@' only
# percent-encoded, but people write it raw).
URL_PASSWORD = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^\s:/@]*:)(?P<password>[^\s/]*)@")
# Query parameters whose value is a credential (an API token in ?token=, a presigned URL's signature).
SECRET_QUERY = re.compile(
    r"(?i)(?P<head>[?&](?:token|access_token|api_key|apikey|password|passwd|secret|"
    r"x-amz-signature|x-amz-security-token|x-amz-credential|sig|signature)=)(?P<value>[^&\s#\"']+)"
)


def redact_urls(text: str) -> str:
    """``text`` with every URL password and secret query value replaced by ***."""
    if "://" in text:
        text = URL_PASSWORD.sub(lambda m: f"{m['head']}{MASK}@", text)
    if "=" in text:
        text = SECRET_QUERY.sub(lambda m: f"{m['head']}{MASK}", text)
    return text


def url_passwords(values: Iterable[str]) -> list[str]:
    """The passwords inside URLs among ``values`` (to be masked also where they appear on their own)."""
    found = []
    for value in values:
        if "://" not in value or "@" not in value:
            continue
        for match in URL_PASSWORD.finditer(value):
            if match["password"]:
                found.append(match["password"])
    return found


def environment_url_passwords(environ: Mapping[str, str]) -> list[str]:
    return url_passwords(environ.values())


def without_url_credentials(url: str) -> str:
    """``url`` with its user and password removed (what a job is given; the node's own credentials serve it)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return redact_urls(url)
    if parts.password is None and parts.username is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port is not None else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def has_url_password(url: str) -> bool:
    try:
        return urlsplit(url).password is not None
    except ValueError:
        return bool(URL_PASSWORD.search(url))
