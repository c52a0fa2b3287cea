"""A small client of the queue's HTTP API (httpx), used by the CLI and by notebooks: the service at AEFORGE_API_URL
(else the one ``aeforge serve`` recorded in AEFORGE_HOME/service.json), with AEFORGE_API_TOKEN."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx

from services.settings import ServiceSettings
from workers.errors import AeforgeError


class ApiError(AeforgeError):
    """The service said no (``status`` is its HTTP status) or could not be reached (``status`` is None)."""

    def __init__(self, message: str, status: int | None = None, errors: list[dict[str, str]] | None = None):
        super().__init__(message)
        self.status = status
        self.errors = errors or []


class WaitTimeout(ApiError):
    """A job did not end within the time :meth:`AeforgeClient.wait` was given; ``job`` is how it was then."""

    def __init__(self, message: str, job: dict[str, Any]):
        super().__init__(message)
        self.job = job


class AeforgeClient:
    def __init__(
        self,
        url: str,
        token: str | None,
        *,
        timeout: float = 30.0,
        http: httpx.Client | None = None,
        url_source: str = "AEFORGE_API_URL",
    ):
        """``http``: an httpx client to send through (tests pass FastAPI's TestClient); default a new one.
        ``url_source``: where ``url`` came from, named when the service cannot be reached."""
        self.url = url.rstrip("/")
        self.url_source = url_source
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = http if http is not None else httpx.Client(base_url=self.url, timeout=timeout)
        self.headers = headers

    @classmethod
    def from_settings(cls, settings: ServiceSettings | None = None) -> AeforgeClient:
        settings = settings or ServiceSettings.load()
        return cls(settings.api_url, settings.client_token(), url_source=settings.api_url_source)

    def close(self) -> None:
        self.http.close()

    # --- requests ----------------------------------------------------------------------------------------------
    def _request(self, method: str, path: str, **kwargs) -> httpx.Response:
        try:
            response = self.http.request(method, path, headers=self.headers, **kwargs)
        except httpx.ReadTimeout:
            # Connected, asked, and no answer in time: the service is up but busy, and a POST may have taken effect.
            took = self.http.timeout.read
            raise ApiError(
                f"the aeforge service at {self.url} took the request but did not answer within {took:g} s"
                + (
                    "; it may still have done it: look with `aeforge jobs` before you send it again"
                    if method not in ("GET", "HEAD", "OPTIONS")
                    else "; try again"
                )
            ) from None
        except httpx.TransportError as exc:
            raise ApiError(
                f"cannot reach the aeforge service at {self.url} ({exc}); the address is from "
                f"{self.url_source}. Is `aeforge serve` running? Otherwise set AEFORGE_API_URL"
            ) from None
        self._raise_for(response)
        return response

    def _raise_for(self, response: httpx.Response) -> None:
        if response.status_code < 400:
            return
        try:
            body = response.json()
            detail, errors = str(body.get("detail", "")), body.get("errors") or []
        except ValueError:
            detail, errors = response.text, []
        if response.status_code == 401:
            detail = f"{detail}: set AEFORGE_API_TOKEN to a token the service knows"
        raise ApiError(detail or f"HTTP {response.status_code}", response.status_code, errors)

    def health(self) -> dict[str, Any]:
        return self._request("GET", "/healthz").json()

    def queue(self) -> dict[str, Any]:
        """GET /queue: per team and owner, what runs and waits, holdings against quota and share, places and reasons."""
        return self._request("GET", "/queue").json()

    def whoami(self) -> dict[str, Any]:
        """{owner, role} of this client's token."""
        return self._request("GET", "/whoami").json()

    def submit(
        self,
        spec_text: str,
        *,
        priority_class: str | None = None,
        priority: int | None = None,
        idempotency_key: str | None = None,
        max_attempts: int | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"spec": spec_text}
        if priority_class is not None:
            body["priority_class"] = priority_class
        if priority is not None:
            body["priority"] = priority
        if idempotency_key is not None:
            body["idempotency_key"] = idempotency_key
        if max_attempts is not None:
            body["max_attempts"] = max_attempts
        return self._request("POST", "/jobs", json=body).json()

    def list_jobs(
        self,
        *,
        states: list[str] | None = None,
        owner: str | None = None,
        name: str | None = None,
        limit: int = 50,
        offset: int = 0,
        cursor: str | None = None,
    ) -> dict[str, Any]:
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        if cursor:
            params["cursor"] = cursor
        if states:
            params["state"] = states
        if owner:
            params["owner"] = owner
        if name:
            params["name"] = name
        return self._request("GET", "/jobs", params=params).json()

    def get(self, job_id: str, *, progress: bool = False) -> dict[str, Any]:
        return self._request("GET", f"/jobs/{job_id}", params={"progress": str(progress).lower()}).json()

    def wait(
        self,
        job_id: str,
        *,
        timeout_s: float | None = None,
        poll_s: float = 1.0,
        on_poll: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Poll the job until it has ended (succeeded, failed or cancelled) and return it as the API shows it
        (its ``result`` holds the metrics, the model and where the pictures are). ``on_poll`` sees the job at each
        poll; past ``timeout_s`` a :class:`WaitTimeout` names the job and its state then."""
        from services.job_states import TERMINAL_STATES

        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            job = self.get(job_id)
            if on_poll is not None:
                on_poll(job)
            if job["state"] in TERMINAL_STATES:
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeout(f"job {job_id} is still {job['state']} after {timeout_s:g} s", job)
            time.sleep(poll_s if deadline is None else max(0.0, min(poll_s, deadline - time.monotonic())))

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._request("POST", f"/jobs/{job_id}/cancel").json()

    def retry(self, job_id: str) -> dict[str, Any]:
        return self._request("POST", f"/jobs/{job_id}/retry").json()

    def logs(self, job_id: str, *, attempt: int | None = None, full: bool = False) -> str:
        """The job's log as a person reads it: step lines (step, loss parts, images/s), phases, the job's and Ray's
        own lines, without colour codes, the lines for the service or Ray's known noise; ``full``: Ray's log as it
        is."""
        params: dict[str, Any] = {} if attempt is None else {"attempt": attempt}
        if full:
            params["full"] = "true"
        return self._request("GET", f"/jobs/{job_id}/logs", params=params).text

    def follow_logs(self, job_id: str, *, attempt: int | None = None, full: bool = False) -> Iterator[str]:
        """The log as the job writes it (readable, or ``full`` as :meth:`logs`), until the job ends (no read timeout:
        a quiet job is not an error)."""
        params: dict[str, Any] = {"follow": "true"}
        if full:
            params["full"] = "true"
        if attempt is not None:
            params["attempt"] = attempt
        try:
            with self.http.stream(
                "GET",
                f"/jobs/{job_id}/logs",
                params=params,
                headers=self.headers,
                timeout=httpx.Timeout(30.0, read=None),
            ) as response:
                if response.status_code >= 400:
                    response.read()
                    self._raise_for(response)
                yield from response.iter_text()
        except httpx.TransportError as exc:
            raise ApiError(f"the log stream from {self.url} broke off ({exc})") from None
