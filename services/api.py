"""The queue's HTTP API (FastAPI): submit, list, inspect, cancel and retry jobs, read their logs.

Every route but ``/healthz`` and the OpenAPI pages needs a bearer token; a user sees and acts on their own jobs
only (another user's job is a 404, as an unknown id is), an admin on all. A spec is validated before anything is
written: a malformed one is a 422 listing each field's problem, and never a row. Request bodies over
AEFORGE_MAX_REQUEST_BYTES are refused with 413 before they are parsed.

``python -m services.api`` (and ``aeforge serve``) runs the API with the dispatcher in the same process, or with
``--workers N`` in N processes on one port (:class:`ServiceWorkers`).
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any, Literal, get_type_hints

from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from jobs.limits import check_submission_limits
from jobs.spec import JobSpec
from services import metrics
from services.access import Identity, Refusal, check_priority, check_submission
from services.dispatcher import (
    HISTORY_HALF_LIVES,
    ClusterView,
    Dispatcher,
    JobLauncher,
    LauncherUnavailable,
    parse_progress,
    recent_usage,
)
from services.door import DoorCheck, check_at_door
from services.door import warm_up as warm_door_checks
from services.job_log import ATTEMPT_NOTE, ReadableLog, readable_text
from services.job_states import STATES
from services.logs import configure_logging, job_fields, redact, uvicorn_log_config
from services.policy import PolicySource
from services.queue_report import only_own_jobs, queue_report
from services.settings import Principal, ServiceSettings, SettingsError
from services.store import InvalidTransition, InvalidValue, Job, JobNotFound, Store, submission_id_for
from workers.errors import AeforgeError
from workers.protocol import parse_phase

log = logging.getLogger(__name__)

Validator = Callable[..., Any]

# The deepest page a listing serves: far beyond any job table, and well inside every database's integer range
# (an offset of 2**63 overflowed SQLite's and PostgreSQL's 64-bit integers: a 500 before this bound).
MAX_OFFSET = 1_000_000_000
# A listing counts the matching jobs up to this many: an exact count of a million finished jobs costs more than the
# page itself, and a person paging needs "more than 10,000", not the number.
MAX_COUNTED = 10_000


def text_problem(value: str) -> str | None:
    """Why ``value`` cannot be a key or name the queue stores or looks up (None when it can): PostgreSQL refuses
    NUL in text, and a control character in a key or name is a mistake in the client."""
    bad = sorted({c for c in value if ord(c) < 0x20 or ord(c) == 0x7F})
    if bad:
        shown = ", ".join(f"\\x{ord(c):02x}" for c in bad)
        return f"must not contain control characters (found {shown})"
    return None


# --- bodies -----------------------------------------------------------------------------------------------------


class SubmitRequest(BaseModel):
    # The examples are what the OpenAPI page shows, and the requests a schemathesis run starts from.
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "spec": "name: example\nmodel: {variant: vae, architecture: mlp, latent_dim: 4}\n"
                    "train: {steps: 10, batch_size: 8}\n",
                    "priority_class": "normal",
                    "idempotency_key": "example-key-1",
                },
                {
                    "spec": {
                        "name": "example-object",
                        "train": {"steps": 5, "max_hours": 1.5},
                        "resources": {"workers": 1},
                    },
                    "max_attempts": 2,
                },
            ]
        },
    )

    spec: str | dict[str, Any] = Field(..., description="the job spec: YAML/JSON text as written, or a JSON object")
    priority_class: str | None = Field(
        None,
        min_length=1,
        max_length=64,
        description="the priority class (the queue policy's classes; default: its default class)",
    )
    priority: int | None = Field(
        None, ge=-1000, le=1000, description="a raw priority, higher runs first: admins only (others name a class)"
    )
    idempotency_key: str | None = Field(
        None,
        min_length=1,
        max_length=200,
        description="a retried submission with the same key (and the same spec, "
        "priority and max_attempts) returns the same job; no control "
        "characters",
    )
    max_attempts: int | None = Field(
        None, ge=1, le=20, description="attempts before the job fails (default: the service's)"
    )

    @field_validator("idempotency_key")
    @classmethod
    def _storable_key(cls, value: str | None) -> str | None:
        problem = None if value is None else text_problem(value)
        if problem:
            raise ValueError(problem)
        return value


class EventOut(BaseModel):
    id: int
    job_id: str
    at: str
    from_state: str | None
    to_state: str
    attempt: int
    reason: str


def _job_out_fields() -> dict[str, Any]:
    """The store's :class:`Job` fields as :meth:`Job.to_dict` gives them (times as ISO 8601 text, no spec), with
    the state as one of STATES and ``cancel_requested`` after it: one list of a job's fields, the store's."""
    shown: dict[str, Any] = {}
    for name, annotation in get_type_hints(Job).items():
        if name in ("seq", "spec_text", "spec_json"):
            continue
        if name == "state":
            annotation = Literal[STATES]
        elif annotation == datetime:
            annotation = str
        elif annotation == datetime | None:
            annotation = str | None
        shown[name] = (annotation, ...)
        if name == "state":
            shown["cancel_requested"] = (bool, ...)
    return shown


JobOut = create_model("JobOut", **_job_out_fields())


class SubmittedOut(JobOut):
    notes: list[str] = Field(
        default_factory=list,
        description="what the service's data check at submission could not check, and why (the job checks it)",
    )


class QueueOut(BaseModel):
    """Where a queued job stands. ``reason``: why the dispatcher's last pass did not start it (None when that pass
    stopped before it: it is behind ``blocked_by``, whose reason is ``blocked_by_reason``)."""

    jobs_ahead: int = Field(..., description="queued jobs that go before this one (priority, then submission order)")
    reason: str | None = None
    blocked_by: str | None = Field(None, description="the job ahead that the dispatcher waits on")
    blocked_by_reason: str | None = None


class JobDetailOut(JobOut):
    spec: str
    events: list[EventOut]
    progress: dict[str, Any] | None = Field(
        None,
        description="a running job's last progress line: step, total, and (when the job reports them) its "
        "latest metrics, images_per_second and trial",
    )
    phase: dict[str, Any] | None = Field(
        None,
        description="a running job's phase (starting Ray, loading data, training, evaluating, pictures, "
        "registering: workers.protocol.PHASES) with its detail (the metric being evaluated), its parts done of "
        "its total and eta_s; in training, the last progress line's fields",
    )
    queue: QueueOut | None = Field(None, description="a queued job's place in the queue and why it waits")


class JobPage(BaseModel):
    items: list[JobOut]
    total: int = Field(description="jobs that match, counted up to 10,000")
    total_exact: bool = Field(description="false when more than 10,000 match (total is then 10,000)")
    limit: int
    offset: int
    next_offset: int | None
    next_cursor: str | None = Field(description="pass as ?cursor= for the next page; null on the last page")


class ErrorOut(BaseModel):
    detail: str
    errors: list[dict[str, str]] = []


def job_out(job: Job) -> dict[str, Any]:
    out = job.to_dict()
    out["cancel_requested"] = job.cancel_requested_by is not None
    return out


def queue_out(store: Store, job: Job) -> dict[str, Any]:
    place = store.queue_place(job)
    # The walk stops at the job it waits for; a job with its own reason was judged itself, so nothing blocks it.
    blocker = place.blocked_by if job.wait_reason is None else None
    return {
        "jobs_ahead": place.jobs_ahead,
        "reason": job.wait_reason,
        "blocked_by": blocker.id if blocker else None,
        "blocked_by_reason": blocker.wait_reason if blocker else None,
    }


def _allowed_methods(app: FastAPI, scope) -> list[str]:
    """The methods some route of ``app`` takes at the request's path, and OPTIONS."""
    from starlette.routing import Match

    methods: set[str] = {"OPTIONS"}
    for route in app.router.routes:
        match, _ = route.matches(scope)
        if match != Match.NONE:
            methods |= set(getattr(route, "methods", None) or ())
    return sorted(methods)


def _error(status: int, detail: str, errors: list[dict[str, str]] | None = None, headers=None) -> JSONResponse:
    return JSONResponse({"detail": detail, "errors": errors or []}, status_code=status, headers=headers)


# --- the size limit ---------------------------------------------------------------------------------------------


class BodySizeLimit:
    """Refuses (413) a request whose body is over ``max_bytes``, by its Content-Length or while reading it, so an
    oversize or endless body is never buffered whole nor parsed."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                await _error(400, "Content-Length is not a number")(scope, receive, send)
                return
            if size > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        delivered = False

        async def replay():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send):
        await _error(413, f"request body too large: the limit is {self.max_bytes} bytes (AEFORGE_MAX_REQUEST_BYTES)")(
            scope, receive, send
        )


# --- request metrics --------------------------------------------------------------------------------------------


class RequestMetrics:
    """Counts every answer per method, route template and status, and times it to the start of the response (a
    followed log stream is timed to its first byte, not its end). The route is the path template ("/jobs/{job_id}"),
    "unmatched" for a path no route has: a bounded label."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        route: str | None = None  # found once per request (a walk over the routes' patterns)

        async def send_and_note(message):
            nonlocal status, route
            if message["type"] == "http.response.start":
                status = message["status"]
                route = _route_of(scope)
                metrics.HTTP_LATENCY.labels(scope["method"], route).observe(time.perf_counter() - started)
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            metrics.HTTP_REQUESTS.labels(scope["method"], route or _route_of(scope), str(status)).inc()


def _route_of(scope) -> str:
    from starlette.routing import Match

    # The route the router chose (FastAPI's routes put themselves in the scope as they match): one pattern to check
    # rather than every route's. A partial match (a 405) leaves its route there too, hence the check.
    chosen = scope.get("route")
    if chosen is not None and chosen.matches(scope)[0] == Match.FULL:
        return getattr(chosen, "path", "unmatched")
    for route in scope["app"].routes if "app" in scope else ():
        if route.matches(scope)[0] == Match.FULL:
            return getattr(route, "path", "unmatched")
    return "unmatched"


# --- the app ----------------------------------------------------------------------------------------------------


def _default_validator() -> Validator:
    from jobs.spec import parse_spec

    return parse_spec


def _spec_errors(exc: Exception) -> list[dict[str, str]] | None:
    errors = getattr(exc, "errors", None)
    if isinstance(errors, list) and all(isinstance(e, dict) for e in errors):
        return [{"loc": str(e.get("loc", "<spec>")), "msg": str(e.get("msg", ""))} for e in errors]
    return None


def create_app(
    store: Store,
    settings: ServiceSettings,
    *,
    validate: Validator | None = None,
    launcher: JobLauncher | None = None,
    dispatcher: Dispatcher | None = None,
    policies: PolicySource | None = None,
    cluster: ClusterView | None = None,
    door_check: Callable[[Any], DoorCheck] = check_at_door,
) -> FastAPI:
    """The API over ``store``. ``validate(text, source)`` turns spec text into a spec object (default
    jobs.spec.parse_spec) or raises an error with ``.errors``; ``door_check(spec)`` checks its data before it is
    queued (services.door); ``launcher`` serves logs; a ``dispatcher`` given here runs in a thread for the app's
    lifetime."""
    validate = validate or _default_validator()
    policies = policies or (dispatcher.policies if dispatcher is not None else PolicySource(settings.policy_file))
    # What plans GET /queue's fresh pass: the service's dispatcher, or (API only) one that only plans.
    planner = dispatcher
    if planner is None and cluster is not None and launcher is not None:
        planner = Dispatcher(
            store,
            cluster,
            launcher,
            max_concurrent_jobs=settings.max_concurrent_jobs,
            retry_backoff_s=settings.retry_backoff_s,
            policies=policies,
        )
    if not settings.tokens:
        raise ValueError(
            "no API tokens are configured: set AEFORGE_TOKENS_FILE or AEFORGE_TOKENS (a list of {token, owner, role})"
        )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        stop = threading.Event()
        threads = []
        # The door's data check imports torch: at start, in the background, not in the first submission.
        threading.Thread(target=warm_door_checks, name="aeforge-door-imports", daemon=True).start()
        if dispatcher is not None:
            threads.append(
                threading.Thread(
                    target=dispatcher.run,
                    args=(stop, settings.dispatch_interval_s),
                    name="aeforge-dispatcher",
                    daemon=True,
                )
            )
        if settings.retention_days is not None:
            from services.retention import Retention

            retention = Retention(store, settings.retention_days, archive_dir=settings.retention_archive_dir)
            threads.append(threading.Thread(target=retention.run, args=(stop,), name="aeforge-retention", daemon=True))
        for thread in threads:
            thread.start()
        try:
            yield
        finally:
            stop.set()
            for thread in threads:
                await run_in_threadpool(thread.join, 30)

    app = FastAPI(
        title="aeforge queue",
        version="1",
        description="Submit autoencoder training jobs to a Ray cluster and follow them.",
        lifespan=lifespan,
    )
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes)
    app.add_middleware(RequestMetrics)  # outermost: refusals of the size limit are counted too
    registry = metrics.make_registry(store, policies)
    bearer = HTTPBearer(auto_error=False, description="an API token from the service's token list")

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(request: Request, exc: RequestValidationError):
        errors = [
            {
                "loc": ".".join(str(p) for p in e.get("loc", ())),
                "msg": str(e.get("msg", "")).removeprefix("Value error, "),
            }
            for e in exc.errors()
        ]
        return _error(422, "invalid request: " + "; ".join(f"{e['loc']}: {e['msg']}" for e in errors), errors)

    @app.exception_handler(JobNotFound)
    async def _not_found(request: Request, exc: JobNotFound):
        return _error(404, f"no job {exc.job_id}")

    @app.exception_handler(InvalidValue)
    async def _unstorable(request: Request, exc: InvalidValue):  # the checks above come first; this is the backstop
        return _error(422, f"invalid request: {exc}", [{"loc": exc.field, "msg": exc.problem}])

    @app.exception_handler(InvalidTransition)
    async def _conflict(request: Request, exc: InvalidTransition):
        return _error(409, str(exc))

    # Starlette's HTTPException (FastAPI's is a subclass): also the 400 for a body that cannot be read (FastAPI's
    # "There was an error parsing the body"), the 404 of an unknown route and the 405 of an unknown method, so that
    # every error has the one documented shape {detail, errors}.
    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        cause = exc.__cause__
        if exc.status_code == 400 and isinstance(cause, Exception):  # FastAPI could not parse the body; say why
            why = "it is nested too deeply" if isinstance(cause, RecursionError) else str(cause) or type(cause).__name__
            return _error(400, f"the request body cannot be read: {why}", [{"loc": "body", "msg": why}])
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:
            # The methods this path takes, in Allow (RFC 9110); OPTIONS itself answers with them, as a 204.
            allowed = _allowed_methods(app, request.scope)
            headers = {**(headers or {}), "Allow": ", ".join(allowed)}
            if request.method == "OPTIONS":
                return Response(status_code=204, headers=headers)
        return _error(exc.status_code, str(exc.detail), headers=headers)

    # A coroutine, so that FastAPI calls it on the event loop: a plain function dependency is run in the thread
    # pool, one more thread hand-off (and its wake-ups) per request for a hash and a comparison. The token file's
    # stat (and its read, when it changed) is a local file's, as the token file's reading has always been.
    async def principal(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> Principal:
        if credentials is None:
            raise HTTPException(
                401, "missing bearer token (Authorization: Bearer <token>)", headers={"WWW-Authenticate": "Bearer"}
            )
        found = settings.principal_for(credentials.credentials)
        if found is None:
            raise HTTPException(401, "unknown token", headers={"WWW-Authenticate": "Bearer"})
        return found

    def largest_node_memory() -> float | None:
        """The largest Ray node's memory as the dispatcher last saw it (None: not known here)."""
        return getattr(getattr(dispatcher, "cluster", None), "largest_node_memory", None)

    def visible_job(job_id: str, who: Principal) -> Job:
        job = store.get(job_id)
        if not who.is_admin and job.owner != who.owner:
            raise JobNotFound(job_id)  # another user's job does not exist for this caller
        return job

    # Every route's error answers, as they are: {detail, errors}. A 422 given here replaces FastAPI's default
    # (HTTPValidationError), which is not what _invalid_request answers.
    invalid_doc: dict[int | str, dict[str, Any]] = {
        422: {"model": ErrorOut, "description": "an invalid parameter or body; `errors` names each field"}
    }
    errors_doc: dict[int | str, dict[str, Any]] = {
        401: {"model": ErrorOut},
        404: {"model": ErrorOut},
        409: {"model": ErrorOut},
        **invalid_doc,
    }

    @app.get("/healthz", tags=["service"], responses={503: {"model": ErrorOut}})
    def healthz():
        """The service is up and its database answers (no token needed)."""
        try:
            store.ping()
        except Exception as exc:
            log.warning("health check: database unreachable: %s", exc)
            return _error(503, "database unreachable")
        return {"status": "ok", "database": store.dialect, "schema_version": store.schema_version}

    @app.get("/metrics", tags=["service"], include_in_schema=False)
    def prometheus_metrics():
        """Prometheus' text format (no token needed, as /healthz): services.metrics lists what it holds."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/whoami", response_model=Identity, tags=["service"], responses={401: {"model": ErrorOut}})
    def whoami(who: Principal = Depends(principal)):
        """Who the token belongs to: its owner and role."""
        return {"owner": who.owner, "role": who.role}

    @app.post(
        "/jobs",
        status_code=201,
        response_model=SubmittedOut,
        tags=["jobs"],
        responses={
            200: {"model": SubmittedOut, "description": "the job an earlier submission with this idempotency key made"},
            400: {"model": ErrorOut, "description": "a body that cannot be read (not JSON, nested too deeply)"},
            403: {
                "model": ErrorOut,
                "description": "a data.source this user may not read; a priority class they may not use, or a raw "
                "priority from a user who is not an admin",
            },
            503: {"model": ErrorOut, "description": "data.source cannot be checked: storage is down"},
            413: {"model": ErrorOut},
            **errors_doc,
        },
    )
    def submit_job(
        body: SubmitRequest,
        response: Response,
        who: Principal = Depends(principal),
        idempotency_key: str | None = Header(None, alias="Idempotency-Key", max_length=200),
    ):
        """Validate a spec and queue it; 422 with every field error if it cannot run."""
        key = body.idempotency_key
        if idempotency_key is not None:
            problem = text_problem(idempotency_key)
            if problem:
                metrics.REJECTIONS.labels("submit", "bad_request").inc()
                return _error(
                    422,
                    f"invalid request: header.Idempotency-Key: {problem}",
                    [{"loc": "header.Idempotency-Key", "msg": problem}],
                )
            if key is not None and key != idempotency_key:
                metrics.REJECTIONS.labels("submit", "bad_request").inc()
                return _error(422, "the Idempotency-Key header and the body's idempotency_key differ")
            key = idempotency_key
        if isinstance(body.spec, str):
            spec_text = body.spec
        else:
            try:
                spec_text = json.dumps(body.spec)
            except (RecursionError, ValueError) as exc:
                msg = "nested too deeply to be a job spec" if isinstance(exc, RecursionError) else str(exc)
                metrics.REJECTIONS.labels("submit", "invalid_spec").inc()
                return _error(422, f"invalid job spec:\n  <spec>: {msg}", [{"loc": "<spec>", "msg": msg}])
        try:
            spec = validate(spec_text, "<request>")
            if isinstance(spec, JobSpec):  # what MLflow stores and the largest node holds: jobs.limits
                check_submission_limits(spec, largest_node_memory(), "<request>")
        except (AeforgeError, ValueError) as exc:  # a SpecError, or a plain ValueError from another validator
            errors = _spec_errors(exc)
            if errors is None:
                errors = [{"loc": "<spec>", "msg": str(exc)}]
            metrics.REJECTIONS.labels("submit", "invalid_spec").inc()
            return _error(422, "invalid job spec:\n" + "\n".join(f"  {e['loc']}: {e['msg']}" for e in errors), errors)
        refused = check_submission(spec, who, settings)  # data.source and register.model_name: services.access
        if refused is not None:
            metrics.REJECTIONS.labels("submit", "forbidden" if refused.status == 403 else "unavailable").inc()
            return _error(refused.status, refused.detail, refused.errors)
        policy = policies.current()
        queued_as = check_priority(policy, who, body.priority_class, body.priority, spec)
        if isinstance(queued_as, Refusal):
            return _error(queued_as.status, queued_as.detail, queued_as.errors)
        klass, priority = queued_as

        door = door_check(spec)  # the data check `aeforge validate` makes, on what the service can reach
        if door.errors:
            return _error(
                422, "invalid job spec:\n" + "\n".join(f"  {e['loc']}: {e['msg']}" for e in door.errors), door.errors
            )
        max_attempts = body.max_attempts or settings.max_attempts
        job, created = store.submit(
            name=spec.name,
            owner=who.owner,
            kind=spec.kind,
            spec_text=spec_text,
            spec_json=json.dumps(spec.model_dump(mode="json"), sort_keys=True),
            resources=spec.resource_request(),
            priority=priority,
            priority_class=klass,
            max_hours=getattr(getattr(spec, "train", None), "max_hours", None),
            max_attempts=max_attempts,
            idempotency_key=key,
        )
        if created:
            metrics.record_submission(policy, job.owner, job.kind)
            log.info("job %s: submitted by %s (%s)", job.id, job.owner, job.kind, extra=job_fields(job))
        else:
            if job.spec_text != spec_text or job.priority != priority or job.max_attempts != max_attempts:
                metrics.REJECTIONS.labels("submit", "idempotency_conflict").inc()
                return _error(409, f"idempotency key {key!r} was used for a different submission (job {job.id})")
            response.status_code = 200
        return job_out(job) | {"notes": door.notes}

    @app.get(
        "/jobs",
        response_model=JobPage,
        tags=["jobs"],
        responses={403: {"model": ErrorOut, "description": "a user asked for another owner's jobs"}, **errors_doc},
    )
    def list_jobs(
        who: Principal = Depends(principal),
        state: list[str] | None = Query(
            None, description=f"one or more of {', '.join(STATES)} (repeat, or comma-separated)"
        ),
        owner: str | None = Query(None, max_length=100),
        name: str | None = Query(None, max_length=100),
        limit: int = Query(50, ge=1, le=500),
        offset: int = Query(0, ge=0, le=MAX_OFFSET),
        cursor: str | None = Query(
            None,
            max_length=19,
            pattern="^[0-9]+$",
            description="the next_cursor of the previous page: the page after it, as fast at any depth (an offset "
            "reads and skips every job before the page)",
        ),
    ):
        """Jobs, newest first, one page at a time; a user's listing holds only their own jobs. ``total`` counts at
        most 10,000 (``total_exact`` is false beyond)."""
        bad = [
            {"loc": f"query.{field}", "msg": problem}
            for field, value in (("owner", owner), ("name", name))
            if value is not None and (problem := text_problem(value))
        ]
        if bad:
            return _error(422, "invalid request: " + "; ".join(f"{e['loc']}: {e['msg']}" for e in bad), bad)
        states = [s.strip() for item in (state or []) for s in item.split(",") if s.strip()]
        unknown = sorted(set(states) - set(STATES))
        if unknown:
            return _error(
                422,
                f"unknown state(s) {', '.join(unknown)}; states are {', '.join(STATES)}",
                [{"loc": "query.state", "msg": f"unknown state {s!r}"} for s in unknown],
            )
        if not who.is_admin:
            if owner is not None and owner != who.owner:
                return _error(403, "a user lists only their own jobs")
            owner = who.owner
        jobs, counted = store.list_jobs(
            states=states or None,
            owner=owner,
            name=name,
            limit=limit + 1,  # one more than the page: whether there is a next one
            offset=offset,
            before_seq=None if cursor is None else int(cursor),
            count_up_to=MAX_COUNTED + 1,
        )
        more = len(jobs) > limit
        jobs = jobs[:limit]
        return {
            "items": [job_out(j) for j in jobs],
            "total": min(counted, MAX_COUNTED),
            "total_exact": counted <= MAX_COUNTED,
            "limit": limit,
            "offset": offset,
            "next_offset": offset + len(jobs) if more and cursor is None else None,
            "next_cursor": str(jobs[-1].seq) if more else None,
        }

    @app.get("/jobs/{job_id}", response_model=JobDetailOut, tags=["jobs"], responses=errors_doc)
    def get_job(
        job_id: str,
        who: Principal = Depends(principal),
        progress: bool = Query(False, description="read the training progress from the running job's log"),
    ):
        """A job with its spec, every state change and its results (MLflow run, registered model version)."""
        job = visible_job(job_id, who)
        out = job_out(job) | {"spec": job.spec_text, "events": [e.to_dict() for e in store.events(job.id)]}
        if job.state == "queued":
            out["queue"] = queue_out(store, job)
        if progress and job.state == "running" and launcher is not None and job.ray_submission_id:
            try:
                text = launcher.logs(job.ray_submission_id)
                out["progress"], out["phase"] = parse_progress(text), parse_phase(text)
            except (LauncherUnavailable, RuntimeError) as exc:
                log.warning("job %s: no progress, the Ray logs are unavailable: %s", job.id, exc, extra=job_fields(job))
        return out

    @app.post(
        "/jobs/{job_id}/cancel", response_model=JobOut, tags=["jobs"], responses={202: {"model": JobOut}, **errors_doc}
    )
    def cancel_job(job_id: str, response: Response, who: Principal = Depends(principal)):
        """A queued job is cancelled now (200); a starting or running one is stopped on Ray and marked
        cancelled once it has stopped (202)."""
        visible_job(job_id, who)
        job = store.request_cancel(job_id, who.owner)
        log.info("job %s: cancel asked by %s (now %s)", job.id, who.owner, job.state, extra=job_fields(job))
        if job.state != "cancelled":
            response.status_code = 202
        return job_out(job)

    @app.post("/jobs/{job_id}/retry", response_model=JobOut, tags=["jobs"], responses=errors_doc)
    def retry_job(job_id: str, who: Principal = Depends(principal)):
        """A failed or cancelled job back to the queue; it resumes from its last checkpoint."""
        visible_job(job_id, who)
        job = store.retry(job_id, who.owner)
        log.info("job %s: retried by %s", job.id, who.owner, extra=job_fields(job))
        return job_out(job)

    @app.get("/queue", tags=["jobs"], responses={401: {"model": ErrorOut}})
    def queue(who: Principal = Depends(principal)):
        """The queue per team and owner: what runs, what waits, what they hold against quota and fair share, and
        each waiting job's place and reason (a user sees every team's totals and their own jobs)."""
        policy = policies.current()
        since = datetime.fromtimestamp(time.time() - HISTORY_HALF_LIVES * policy.half_life_s, UTC)
        snapshot = store.snapshot(history_since=since)
        plan = total = recent = None
        if planner is not None:
            try:
                total = {k: float(v) for k, v in planner.cluster.total_resources().items()}
            except LauncherUnavailable as exc:
                log.warning("GET /queue: the cluster is not reachable (%s); showing the stored reasons", exc)
            if total:
                plan = planner.plan(snapshot, total, policy)
                recent = recent_usage(policy, snapshot, total, planner.clock())
        report = queue_report(snapshot, policy, plan=plan, total=total, recent=recent, policy_problem=policies.problem)
        return report if who.is_admin else only_own_jobs(report, who.owner)

    @app.get(
        "/jobs/{job_id}/logs",
        tags=["jobs"],
        response_class=StreamingResponse,
        responses={200: {"content": {"text/plain": {}}}, 503: {"model": ErrorOut}, **errors_doc},
    )
    async def job_logs(
        job_id: str,
        who: Principal = Depends(principal),
        follow: bool = Query(False, description="keep streaming until the job ends"),
        attempt: int | None = Query(None, ge=1, description="default: the latest attempt"),
        full: bool = Query(
            False,
            description="Ray's log as it is (colour codes, the lines for the service, Ray's own noise); by default "
            "the readable log: step lines, phases and the job's and Ray's lines, without those",
        ),
    ):
        """The job's log from Ray (plain text), readable unless full=true (services.job_log); with follow=true,
        streamed as it is written, across attempts."""
        job = await run_in_threadpool(visible_job, job_id, who)
        if launcher is None:
            return _error(503, "this service has no Ray connection to read logs from")
        if attempt is not None and attempt > job.attempts:
            return _error(404, f"job {job.id} has had {job.attempts} attempt(s), not {attempt}")
        if not follow:
            number = attempt or job.attempts
            if number == 0:
                return Response("", media_type="text/plain")
            try:
                text = await run_in_threadpool(launcher.logs, submission_id_for(job.id, number))
            except LauncherUnavailable as exc:
                return _error(503, str(exc))
            return Response(redact(text if full else readable_text(text)), media_type="text/plain")
        stream = _follow_logs(store, launcher, job.id, attempt)
        return StreamingResponse(stream if full else _readable(stream), media_type="text/plain")

    return app


# A follower of a job that has not started hears a heartbeat line this often, and is let go after this long (the
# connection would otherwise be held for as long as the job waits: hours behind a busy queue, forever if it never
# starts). Read when a stream starts, so tests may shorten them.
FOLLOW_HEARTBEAT_S = 30.0
FOLLOW_WAIT_LIMIT_S = 600.0


async def _readable(chunks: AsyncIterator[str]) -> AsyncIterator[str]:
    """The readable lines of a streamed log (services.job_log), each as soon as its line is complete."""
    reader = ReadableLog()
    async for chunk in chunks:
        lines = reader.feed(chunk)
        if lines:
            yield "\n".join(lines) + "\n"
    rest = reader.flush()
    if rest:
        yield "\n".join(rest) + "\n"


async def _follow_logs(
    store: Store, launcher: JobLauncher, job_id: str, only_attempt: int | None, poll_s: float = 1.0
) -> AsyncIterator[str]:
    """Stream the job's Ray log as it is written: one attempt if asked for, else each attempt in turn until the
    job is finished. While there is no log to read yet, a heartbeat line every FOLLOW_HEARTBEAT_S, and the stream
    ends after FOLLOW_WAIT_LIMIT_S of that, saying so."""
    current = only_attempt
    heartbeat_s, wait_limit_s = FOLLOW_HEARTBEAT_S, FOLLOW_WAIT_LIMIT_S
    waiting_since: float | None = None
    last_beat = 0.0

    def waiting(job: Job) -> tuple[str | None, bool]:
        """(a heartbeat or a last line when one is due, whether the stream ends with it)."""
        nonlocal waiting_since, last_beat
        now = time.monotonic()
        if waiting_since is None:
            waiting_since = last_beat = now
            return None, False
        why = f" ({job.wait_reason})" if job.wait_reason else ""
        if now - waiting_since >= wait_limit_s:
            return (
                f"[aeforge] job {job_id} is still {job.state}{why} after {now - waiting_since:.0f} s; this stream "
                f"ends here: follow it again with `aeforge logs -f {job_id}`\n"
            ), True
        if now - last_beat >= heartbeat_s:
            last_beat = now
            return f"[aeforge] job {job_id} is {job.state}{why}; waiting for its log\n", False
        return None, False

    while True:
        job = await run_in_threadpool(store.get, job_id)
        if current is None:
            if job.attempts == 0:  # not started yet
                if job.is_terminal:
                    return
                line, last = waiting(job)
                if line is not None:
                    yield line
                if last:
                    return
                await asyncio.sleep(poll_s)
                continue
            current = job.attempts
        sid = submission_id_for(job_id, current)
        try:
            info = await run_in_threadpool(launcher.info, sid)
        except LauncherUnavailable:
            info = None
        if info is None:  # claimed but not on Ray yet, or its Ray job is gone
            if only_attempt is None and job.attempts > current:
                current += 1
            elif job.is_terminal or only_attempt is not None and job.attempts > current:
                return
            line, last = waiting(job)
            if line is not None:
                yield line
            if last:
                return
            await asyncio.sleep(poll_s)
            continue
        waiting_since = None
        try:
            async for chunk in launcher.tail(sid):
                yield redact(chunk)
        except LauncherUnavailable as exc:
            yield f"\n[aeforge] logs unavailable: {exc}\n"
            return
        if only_attempt is not None:
            return
        # This attempt's Ray job has ended: the job is finished, or re-queued for another attempt.
        while True:
            job = await run_in_threadpool(store.get, job_id)
            if job.attempts > current:
                current += 1
                yield f"\n{ATTEMPT_NOTE}{job_id}: attempt {current}\n"
                break
            if job.is_terminal:
                return
            await asyncio.sleep(poll_s)


# --- running the service ----------------------------------------------------------------------------------------


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to ``host``:``port`` (port 0: a free one), before anything else starts: a port in use is a
    one-line error, not a Ray head started for nothing and a traceback from the server."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named, not left 0: asyncio turns Nagle's algorithm off (TCP_NODELAY) only on connections whose
    # socket says TCP, and with it on, uvicorn's two writes per response (head, body) met the client's delayed ACK:
    # every answer of a single-process service took 40-50 ms (a /healthz 44 ms, now under 1 ms).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a restart reuses the port at once
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise SettingsError(f"cannot listen on {host}:{port}: {exc.strerror or exc} (choose another --port)") from None
    sock.set_inheritable(True)
    return sock


def build_service_app(settings: ServiceSettings, ray_address: str, dispatch: bool) -> FastAPI:
    """The service's app over ``settings``' database and the Ray cluster at ``ray_address``, with the dispatcher
    (run for the app's lifetime) when ``dispatch``."""
    from services.dispatcher import RayAutoscalerDemand, RayClusterView, RayJobLauncher
    from services.policy import describe_policy

    store = Store(settings.db_url)
    launcher = RayJobLauncher(ray_address)
    cluster = RayClusterView(launcher)
    policies = PolicySource(settings.policy_file)
    dispatcher = None
    if dispatch:
        log.info("queue policy: %s", describe_policy(policies.current()))
        # A submission's memory estimate (jobs.limits) builds its model on torch's meta device: torch is imported
        # now, beside the start, rather than by the first submission.
        threading.Thread(target=importlib.import_module, args=("workers.pack",), daemon=True).start()
        autoscaler = None
        if settings.autoscaler_address:
            autoscaler = RayAutoscalerDemand(settings.autoscaler_address)
        dispatcher = Dispatcher(
            store,
            cluster,
            launcher,
            max_concurrent_jobs=settings.max_concurrent_jobs,
            job_module=settings.job_module,
            job_python=settings.job_interpreter(),
            retry_backoff_s=settings.retry_backoff_s,
            allowed_data_prefixes=settings.allowed_data_prefixes,
            policies=policies,
            autoscaler=autoscaler,
        )
    return create_app(store, settings, launcher=launcher, dispatcher=dispatcher, policies=policies, cluster=cluster)


def run_service(
    settings: ServiceSettings,
    host: str = "127.0.0.1",
    port: int = 8000,
    dispatch: bool = True,
    on_ready: Callable[[str], None] | None = None,
    workers: int | None = None,
) -> None:
    """The API and (unless ``dispatch`` is False) the dispatcher, until interrupted: in this process, or with
    ``workers`` (default AEFORGE_API_WORKERS) > 1 in that many worker processes on one port (:class:`ServiceWorkers`;
    they read their settings from this process's environment). While it listens, AEFORGE_HOME/service.json records
    its address for the CLI (services.settings.api_url_for)."""
    import uvicorn

    from services.embedded_ray import EmbeddedRay
    from services.settings import (
        check_no_url_credentials,
        local_tokens_path,
        remove_service_record,
        url_for_listener,
        write_local_admin_token,
        write_service_record,
    )

    check_no_url_credentials()
    configure_logging()  # AEFORGE_LOG_FORMAT: text (default) or json; secrets masked
    workers = settings.api_workers if workers is None else workers
    if workers < 1:
        raise SettingsError(f"--workers must be at least 1, got {workers}")
    sock = listen(host, port)
    url = url_for_listener(host, sock.getsockname()[1])
    embedded_ray: EmbeddedRay | None = None
    try:
        if not settings.tokens:
            principal = write_local_admin_token(settings.home)
            log.warning(
                "no API tokens were configured; wrote an admin token for %s to %s",
                principal.owner,
                local_tokens_path(settings.home),
            )
            settings = ServiceSettings.load()
        address = settings.ray_address
        if address is None:
            embedded_ray = EmbeddedRay(settings.home)
            address = embedded_ray.start()
            log.info("the embedded Ray head's dashboard and Jobs API are at %s", address)
        if workers > 1:
            Store(settings.db_url).close()  # the schema upgraded once, and a database that fails, failed here
            ServiceWorkers(sock, url, settings.home, address, dispatch, workers, settings.job_interpreter()).run(
                on_ready
            )
            return
        app = build_service_app(settings, address, dispatch)
        home = settings.home

        class RecordingServer(uvicorn.Server):
            """Records the address once it listens and removes the record when it shuts down: in ``shutdown``,
            because after a SIGINT or SIGTERM uvicorn raises the signal again once it has stopped, and code after
            ``run`` never runs."""

            async def startup(self, sockets=None):
                await super().startup(sockets=sockets)
                if not self.should_exit:
                    record = write_service_record(home, url)
                    log.info("serving the aeforge API at %s (recorded in %s for the CLI)", url, record)
                    if on_ready is not None:
                        on_ready(url)

            async def shutdown(self, sockets=None):
                try:
                    await super().shutdown(sockets=sockets)
                finally:
                    remove_service_record(home)
                    if embedded_ray is not None:  # after the dispatcher has stopped: a clean stop ends its head
                        embedded_ray.stop()

        try:
            RecordingServer(uvicorn.Config(app, log_level="info", log_config=uvicorn_log_config())).run(sockets=[sock])
        finally:
            remove_service_record(home)  # also when it stopped without a shutdown (it failed to start)
    finally:
        if embedded_ray is not None:
            embedded_ray.stop()
        sock.close()


class ServiceWorkers:
    """``count`` worker processes serving one listening socket (the kernel gives each new connection to one of
    them): the first also dispatches when the service does, the others serve the API only (as `serve --no-dispatch`).
    Why processes: one Python process serves some 250-300 submissions/s before its interpreter lock is the limit,
    however many threads it has. This process supervises: it starts them (``python -m services.api --worker-fd``,
    this environment plus the Ray address and a metrics directory: services.metrics), records the service's address
    once one answers, starts again one that exits, and stops them all on SIGTERM or SIGINT. A worker that keeps
    exiting within its first seconds (a setting it cannot use, a database it cannot reach) stops the service, with
    its log above."""

    RESTART_DELAY_S = 1.0
    EARLY_EXIT_S = 10.0  # an exit this soon after the start counts towards giving up
    EARLY_EXITS = 3
    STOP_S = 30.0  # a worker's graceful stop (the dispatcher's thread is joined within 30 s)

    def __init__(
        self,
        sock: socket.socket,
        url: str,
        home,
        ray_address: str,
        dispatch: bool,
        count: int,
        job_python: str | None = None,
    ):
        self.sock = sock
        # The jobs' interpreter as this process chose it: for an embedded head its own, which a worker (given the
        # head's address as RAY_ADDRESS) would otherwise take for a cluster's `python`.
        self.job_python = job_python
        self.url = url
        self.home = home
        self.ray_address = ray_address
        self.dispatch = dispatch
        self.count = count

    def _start(self, index: int, metrics_dir: str):
        import subprocess

        fd = self.sock.fileno()
        env = dict(os.environ, RAY_ADDRESS=self.ray_address, AEFORGE_HOME=str(self.home))
        if self.job_python:
            env["AEFORGE_JOB_PYTHON"] = self.job_python
        env[metrics.MULTIPROCESS_DIR] = metrics_dir
        # Not `-m services.api`: that module would run as __main__ beside the services.api its imports load.
        args = [sys.executable, "-c", "from services.api import main; raise SystemExit(main())", "--worker-fd", str(fd)]
        if not (self.dispatch and index == 0):
            args.append("--no-dispatch")
        process = subprocess.Popen(args, env=env, pass_fds=(fd,))
        log.info("API worker %d: pid %d%s", index, process.pid, " (dispatching)" if "--no-dispatch" not in args else "")
        return process, time.monotonic()

    def _answers(self) -> bool:
        import urllib.request

        direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # its own port: never via a proxy
        try:
            with direct.open(f"{self.url}/healthz", timeout=2) as answer:
                return answer.status == 200
        except OSError:
            return False

    def run(self, on_ready: Callable[[str], None] | None = None) -> None:
        import shutil
        import subprocess
        import tempfile

        from services.settings import remove_service_record, write_service_record

        stop = threading.Event()
        previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                previous[signum] = signal.signal(signum, lambda *_: stop.set())
        metrics_dir = tempfile.mkdtemp(prefix="aeforge-metrics-")
        workers = []
        early_exits = [0] * self.count
        try:
            workers = [self._start(i, metrics_dir) for i in range(self.count)]
            ready = False
            while not stop.wait(0.2):
                if not ready and self._answers():
                    ready = True
                    record = write_service_record(self.home, self.url)
                    log.info(
                        "serving the aeforge API at %s with %d worker processes (recorded in %s for the CLI)",
                        self.url,
                        self.count,
                        record,
                    )
                    if on_ready is not None:
                        on_ready(self.url)
                for index, (process, started) in enumerate(workers):
                    code = process.poll()
                    if code is None or stop.is_set():
                        continue
                    early_exits[index] = early_exits[index] + 1 if time.monotonic() - started < self.EARLY_EXIT_S else 0
                    if early_exits[index] >= self.EARLY_EXITS:
                        raise SettingsError(
                            f"API worker {index} exited with {code} {self.EARLY_EXITS} times within "
                            f"{self.EARLY_EXIT_S:g} s of its start: see its log above"
                        )
                    log.warning("API worker %d (pid %d) exited with %s; starting it again", index, process.pid, code)
                    if stop.wait(self.RESTART_DELAY_S):
                        break
                    workers[index] = self._start(index, metrics_dir)
        finally:
            for process, _ in workers:
                if process.poll() is None:
                    process.terminate()
            deadline = time.monotonic() + self.STOP_S
            for process, _ in workers:
                try:
                    process.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:  # past the graceful stop: it is killed
                    process.kill()
                    process.wait()
            for signal_number, handler in previous.items():
                signal.signal(signal_number, handler)
            remove_service_record(self.home)
            shutil.rmtree(metrics_dir, ignore_errors=True)


def run_worker(fd: int, dispatch: bool) -> None:
    """One of :class:`ServiceWorkers`' processes: the app over the listening socket ``fd`` it was given, its settings
    from the environment (the supervisor's, with the Ray address it uses), until SIGTERM."""
    import uvicorn

    configure_logging()
    settings = ServiceSettings.load()
    if settings.ray_address is None:
        raise SettingsError("an API worker is started by `aeforge serve --workers N`, which sets RAY_ADDRESS")
    sock = socket.socket(fileno=fd)
    threading.Thread(
        target=_stop_when_orphaned, args=(os.getppid(),), name="aeforge-supervisor-watch", daemon=True
    ).start()
    app = build_service_app(settings, settings.ray_address, dispatch)
    uvicorn.Server(uvicorn.Config(app, log_level="info", log_config=uvicorn_log_config())).run(sockets=[sock])


def _stop_when_orphaned(supervisor: int, poll_s: float = 1.0) -> None:
    """A worker whose supervisor is gone (killed outright: it could not stop its workers) stops as on SIGTERM,
    rather than serve on alone with nothing to start it again or stop it."""
    while os.getppid() == supervisor:
        time.sleep(poll_s)
    log.warning("the service's supervisor (pid %d) is gone; this worker stops", supervisor)
    os.kill(os.getpid(), signal.SIGTERM)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m services.api", description="the aeforge queue service")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--no-dispatch", action="store_true", help="API only (another process dispatches)")
    parser.add_argument("--workers", type=int, default=None, help="API processes (default AEFORGE_API_WORKERS, 1)")
    parser.add_argument("--worker-fd", type=int, default=None, help=argparse.SUPPRESS)  # ServiceWorkers' own
    args = parser.parse_args(argv)
    try:
        if args.worker_fd is not None:
            run_worker(args.worker_fd, dispatch=not args.no_dispatch)
        else:
            run_service(
                ServiceSettings.load(),
                host=args.host,
                port=args.port,
                dispatch=not args.no_dispatch,
                workers=args.workers,
            )
    except AeforgeError as exc:  # a setting or the port: one line, as the CLI says it
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
