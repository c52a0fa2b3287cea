"""The Ray Train plumbing that a train job and each sweep trial share: joining the cluster, the settings a job's
processes get, building a TorchTrainer, and running it so that a worker's own error is what the user sees.

The job spec crosses into the Ray workers as the typed :class:`~jobs.spec.JobSpec` object itself (Ray pickles it),
never as YAML or JSON text to be parsed again.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from jobs.spec import JobSpec, SpecError
from workers import settings
from workers.errors import AeforgeError
from workers.redaction import without_url_credentials

SOURCE_ROOT = Path(__file__).resolve().parent.parent


def job_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The settings a job's processes need, taken from ``environ`` (default: this process's environment): where
    storage and MLflow are (resolved here), and this source tree on PYTHONPATH so that Ray's processes import the
    same packages as this one.

    No credential (settings.CREDENTIAL_ENV_VARS), ever: this goes into runtime environments, which Ray shows in
    `ray job list`, its dashboard and its logs. Ray's processes take the credentials of the node they run on (the
    environment `ray start` ran in, which a local Ray started by this process inherits; a mounted secret file; an
    instance role)."""
    env_in = os.environ if environ is None else environ
    # A URL's user and password (http://user:pass@mlflow) are credentials too: the node's own serve the job.
    env = {name: without_url_credentials(env_in[name]) for name in settings.JOB_ENV_VARS if env_in.get(name)}
    # Locations, never this process's AEFORGE_HOME: a job's processes may run on other hosts, each with a home (and
    # a node cache in it) of its own. The embedded defaults under this AEFORGE_HOME are named explicitly instead.
    home = Path(env_in.get("AEFORGE_HOME", ".aeforge")).expanduser().resolve()
    env.setdefault("AEFORGE_STORAGE", (home / "storage").as_uri())
    if "MLFLOW_TRACKING_URI" not in env:
        env["MLFLOW_TRACKING_URI"] = f"sqlite:///{home / 'mlflow.db'}"
        env["AEFORGE_MLFLOW_ARTIFACT_ROOT"] = (home / "mlartifacts").as_uri()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SOURCE_ROOT), env_in.get("PYTHONPATH", "")) if p)
    return env


# How often Ray Train's controller polls its workers (Ray's default: 2 s). It also notices a finished run only at a
# poll: at 2 s, a fit's tail after the workers returned measured 4.0 s here, at 0.25 s 0.9 s (benchmarks/
# bench_ray_fit.py). A poll is one small actor call per worker. Ray Train reads it in the driver's environment and
# passes it on to the controller it starts; a value set by the user is kept.
HEALTH_CHECK_INTERVAL_S = "0.25"


def connect_ray() -> None:
    """Join RAY_ADDRESS's cluster, or start a local Ray sized to this machine (the embedded default)."""
    import ray

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", HEALTH_CHECK_INTERVAL_S)
    if ray.is_initialized():
        return
    address = settings.ray_address()
    if address and re.fullmatch(r"[\w.-]+:\d+", address):
        check_ray_auth(address)
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
        # A Ray Job's driver (the queue launched us): the job's runtime env, with these settings, is already in
        # force, and Ray refuses a second one that sets the same variables.
        ray.init(address=settings.ray_address() or "auto", log_to_driver=True)
    else:
        # "local": a new Ray on this machine even if another one runs here (ray.init(None) would join the last
        # cluster `ray start` recorded in /tmp/ray, which is not what "no RAY_ADDRESS" means).
        # A Ray on this machine: its processes share this host, and so this AEFORGE_HOME (the node cache).
        env = {**job_environment(), "AEFORGE_HOME": str(settings.home())}
        ray.init(address=settings.ray_address() or "local", runtime_env={"env_vars": env}, log_to_driver=True)
    _stop_on_sigterm()


class RayAuthError(AeforgeError):
    """The Ray cluster asks for an authentication token this process does not have."""


def check_ray_auth(address: str) -> None:
    """One quick look at the cluster's GCS before ray.init, which would retry a refused token for 20 s, a line a
    second, and end in a traceback: a cluster with token auth is named with the setting and the token's place."""
    from ray.exceptions import AuthenticationError

    try:
        from ray._raylet import GcsClient  # type: ignore[attr-defined]  # compiled; _raylet.pyi omits it
    except ImportError:  # a Ray without it: ray.init says what it says
        return
    saved = os.dup(2)  # the GCS client's own warning line goes to the C++ log, not to the user's terminal
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            try:
                GcsClient(address=address)
            finally:
                os.dup2(saved, 2)
    except AuthenticationError:
        mode = os.environ.get("RAY_AUTH_MODE", "disabled")
        where = (
            os.environ.get("RAY_AUTH_TOKEN_PATH")
            or ("RAY_AUTH_TOKEN" if os.environ.get("RAY_AUTH_TOKEN") else "")
            or str(Path.home() / ".ray" / "auth_token")
        )
        if mode != "token":
            raise RayAuthError(
                f"the Ray cluster at {address} (RAY_ADDRESS) uses token authentication: set "
                f"RAY_AUTH_MODE=token and put the cluster's token in {where} (or name its file in "
                f"RAY_AUTH_TOKEN_PATH)"
            ) from None
        raise RayAuthError(
            f"the Ray cluster at {address} (RAY_ADDRESS) refused the token in {where}: it is not this cluster's token"
        ) from None
    except Exception:  # unreachable, or another problem: ray.init reports it in its own words
        return
    finally:
        os.close(saved)


# Runs this driver trains (run names), and the storage their stop requests go to: a SIGTERM asks them to stop.
_STOPPABLE: list[tuple[Any, str]] = []
# The least time a graceful stop gets before the fit is aborted (when the stop wait is too short to leave more).
MIN_GRACE_S = 5.0


def stop_gracefully_on_sigterm(storage, run_name: str) -> None:
    """A SIGTERM (the queue preempting or cancelling the job) first asks this run's workers to stop: they checkpoint
    at the end of their current log window and return, so that nothing trained is lost. Any request left from an
    earlier attempt is cleared first."""
    from workers.ray_worker import stop_request_path

    with contextlib.suppress(Exception):  # none there: the usual case
        storage.delete(stop_request_path(run_name))
    _STOPPABLE.append((storage, run_name))


def _ask_to_stop() -> None:
    from workers.ray_worker import stop_request_path

    for storage, run_name in list(_STOPPABLE):
        try:
            storage.put_bytes(b"stop\n", stop_request_path(run_name))
        except Exception as exc:  # then the abort below stops it, from its last periodic checkpoint
            print(f"aeforge: could not ask run {run_name} to stop gracefully: {exc}", file=sys.stderr, flush=True)


def _stop_on_sigterm() -> None:
    """Ray stops a job (`ray job stop`, a cancel or a preemption in the queue) with SIGTERM to its driver, and
    ray.init has just put its own SIGTERM handler in place (it logs and dies). Take it back. Inside a fit of a run
    registered with :func:`stop_gracefully_on_sigterm`, ask its workers to checkpoint and return (they see the
    request within seconds), and abort the fit as on Ctrl-C only if they have not by the grace period's end;
    otherwise stop as on Ctrl-C at once: inside a fit, Ray Train's own Ctrl-C handler aborts the run gracefully
    (workers stopped, placement group and its detached cleaner removed), and :func:`fit` then raises
    KeyboardInterrupt; elsewhere KeyboardInterrupt is raised at once. Either way the `with` blocks mark the job's
    MLflow runs KILLED. The queue gives a job RAY_JOB_STOP_WAIT_TIME_S for this before Ray sends SIGKILL."""
    import signal
    import threading

    from workers.tracking import STOP_REQUESTED

    def stop(signum, frame):
        first = not STOP_REQUESTED.is_set()
        STOP_REQUESTED.set()
        on_ctrl_c = signal.getsignal(signal.SIGINT)
        if callable(on_ctrl_c) and on_ctrl_c is not signal.default_int_handler:
            if first and _STOPPABLE:
                stop_wait = float(os.environ.get("RAY_JOB_STOP_WAIT_TIME_S", "30"))
                grace = max(MIN_GRACE_S, stop_wait - 10.0)
                threading.Thread(target=_ask_to_stop, name="aeforge-ask-to-stop", daemon=True).start()
                # The fallback: Ctrl-C on the main thread (where Ray Train's handler runs) after the grace period.
                timer = threading.Timer(grace, os.kill, args=(os.getpid(), signal.SIGINT))
                timer.daemon = True
                timer.start()
                return
            on_ctrl_c(signal.SIGINT, frame)  # a fit's (or a Tune run's) abort
            return
        raise KeyboardInterrupt(f"job stopped (signal {signum})")

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop)


def describe_resources(resources: Mapping[str, float], also: Iterable[str] = ()) -> str:
    """ "CPU 4, GPU 1": the schedulable resources (node markers and memory left out), with ``also`` shown at 0."""
    keys = set(resources) | set(also)
    parts = []
    for key in sorted(keys):
        value = float(resources.get(key, 0.0))
        if key in ("memory", "object_store_memory") or key.startswith(("node:", "accelerator_type:")):
            continue
        if key in ("CPU", "GPU") or value or key in also:
            parts.append(f"{key} {value:g}")
    return ", ".join(parts) or "nothing"


def fits(request: Mapping[str, float], available: Mapping[str, float]) -> bool:
    return all(amount <= available.get(name, 0.0) + 1e-9 for name, amount in request.items() if amount > 0)


def never_fits(asked: Mapping[str, float], total: Mapping[str, float]) -> str | None:
    """Why a job asking for ``asked`` can never run on a cluster of ``total`` resources, or None when it fits: the
    one check of the queue's admission and of `aeforge run`."""
    if fits(asked, total):
        return None
    return (
        f"it asks for {describe_resources(asked)} but the whole Ray cluster has {describe_resources(total, also=asked)}"
    )


def check_fits_cluster(spec: JobSpec, cluster: Mapping[str, float]) -> None:
    """SpecError naming ``resources`` when the job can never run on this cluster (it would wait forever)."""
    why = never_fits(spec.resource_request(), cluster)
    if why:
        raise SpecError(
            [
                {
                    "loc": "resources",
                    "msg": f"can never run here: {why}; lower resources.workers / "
                    f"cpus_per_worker / gpus_per_worker or use a larger cluster",
                }
            ]
        )


def sweep_concurrency(spec: JobSpec, cluster: Mapping[str, float]) -> tuple[int, dict[str, float], str | None]:
    """How many trials of a sweep run at once on ``cluster`` (the spec's max_concurrent_trials, capped to what fits),
    what they hold together, and a line saying so when the cap cut the spec's number (None otherwise). SpecError
    naming ``resources`` when not even one trial fits. The queue's admission and the sweep's driver both use it."""
    from jobs.spec import check_cluster, trial_cpus

    n = check_cluster(spec, dict(cluster))
    assert spec.sweep is not None, "a sweep job has a sweep section (JobSpec's validation)"
    r = spec.resources
    per_trial = {"CPU": trial_cpus(r), "GPU": float(r.workers * r.gpus_per_worker)}
    wanted = min(spec.num_trials(), spec.sweep.max_concurrent_trials or spec.num_trials())
    note = None
    if n < wanted:
        need = f"{per_trial['CPU']:g} CPU" + (f" and {per_trial['GPU']:g} GPU" if per_trial["GPU"] else "")
        note = (
            f"{wanted} trials at once asked, {n} at a time run: each trial needs {need}, the cluster has "
            f"{describe_resources(cluster, also=('CPU', 'GPU'))}"
        )
    return n, {k: v * n for k, v in per_trial.items()}, note


def pack_device_free_bytes(spec: JobSpec, concurrent: int) -> float | None:
    """Free memory of the device a sweep's pack trains on (sweep.pack auto): a GPU's, asked of one through a Ray
    task that holds it, or a CPU trial's share of the memory Ray gives tasks on the cluster. None when a GPU does
    not answer within a minute (all of them busy): the packs are then sized by concurrency alone."""
    import ray

    r = spec.resources
    if r.gpus_per_worker <= 0:
        return float(ray.cluster_resources().get("memory", 0.0)) / max(1, concurrent)

    @ray.remote(num_gpus=r.gpus_per_worker, num_cpus=0)
    def free_gpu_bytes() -> float:
        import torch

        return float(torch.cuda.mem_get_info()[0])

    try:
        return ray.get(free_gpu_bytes.remote(), timeout=60)
    except Exception:  # GetTimeoutError, or a node without CUDA: no memory figure
        return None


def largest_node_memory() -> float | None:
    """Ray's ``memory`` resource (bytes) of the largest live node of the cluster this process joined."""
    import ray

    memories = [float(n.get("Resources", {}).get("memory", 0.0)) for n in ray.nodes() if n.get("Alive")]
    return max(memories, default=0.0) or None


def check_fits_memory(spec: JobSpec) -> None:
    """SpecError naming the field when one worker of the job needs more memory than the largest node has: it would
    be killed for memory, or fail allocating, on every attempt (the service checks this at submit as well)."""
    from jobs.limits import memory_errors

    errors = memory_errors(spec, largest_node_memory())
    if errors:
        raise SpecError(errors)


def cluster_resources() -> dict[str, float]:
    import ray

    return {k: float(v) for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}


def build_trainer(
    spec: JobSpec,
    run_name: str,
    storage,
    mlflow_run_id: str | None,
    callbacks=(),
    trial: str | None = None,
    stop_on: str | None = None,
):
    """One TorchTrainer for a `train` spec (or one sweep trial); the Train run is named after the job/trial id,
    so running the same id again resumes from its last checkpoint. ``trial``: a sweep trial's run name, which its
    progress lines carry. ``stop_on``: whose stop request (:func:`stop_gracefully_on_sigterm`) the workers obey,
    when not the run's own (a sweep trial obeys its sweep's)."""
    from workers.ray_worker import WorkerJob, train_loop_per_worker

    job = WorkerJob(
        spec=spec,
        run_name=run_name,
        mlflow_run_id=mlflow_run_id,
        mlflow_tracking_uri=settings.mlflow_tracking_uri(),
        trial=trial,
        stop_on=stop_on,
    )
    return _torch_trainer(spec, run_name, storage, train_loop_per_worker, job, callbacks)


def build_pack_trainer(
    spec: JobSpec, run_name: str, storage, members: list[dict], callbacks=(), stop_on: str | None = None
):
    """One TorchTrainer for a pack of sweep trials (workers/pack.py), named ``run_name`` (the pack's own id: the
    same id again resumes its last checkpoint). ``members``: each trial's spec, run name, job id and MLflow run id
    (workers.ray_worker.PackWorkerJob). ``stop_on``: as for :func:`build_trainer` (the sweep's job id)."""
    from workers.ray_worker import PackWorkerJob, pack_loop_per_worker

    job = PackWorkerJob(
        spec=spec,
        run_name=run_name,
        members=members,
        mlflow_tracking_uri=settings.mlflow_tracking_uri(),
        stop_on=stop_on,
    )
    return _torch_trainer(spec, run_name, storage, pack_loop_per_worker, job, callbacks)


def _torch_trainer(spec: JobSpec, run_name: str, storage, loop, job, callbacks):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    fs, base = storage.pyarrow_filesystem()
    r = spec.resources
    return TorchTrainer(
        loop,
        train_loop_config={"job": job},
        scaling_config=ScalingConfig(
            num_workers=r.workers, use_gpu=r.gpus_per_worker > 0, resources_per_worker=r.per_worker()
        ),
        # Train V2's RunConfig takes worker_runtime_env; ray.train picks V2 at import, mypy reads V1's.
        run_config=RunConfig(  # type: ignore[call-arg]
            name=run_name,
            storage_path=f"{base}/ray",
            storage_filesystem=fs,
            checkpoint_config=CheckpointConfig(num_to_keep=spec.train.num_to_keep),
            failure_config=FailureConfig(max_failures=spec.train.max_failures),
            callbacks=list(callbacks),
            # Settings as this driver sees them now, whenever the cluster was started.
            worker_runtime_env={"env_vars": job_environment()},
        ),
    )


def user_error(exc: BaseException) -> BaseException:
    """The error to show for a failed fit: a worker's own AeforgeError (a DataError, TrainingDiverged, StorageError:
    its message is the whole story) rather than Ray's wrapper around it; anything else as Ray raised it."""
    from ray.train import WorkerGroupError

    if isinstance(exc, WorkerGroupError):
        for _, failure in sorted(exc.worker_failures.items()):
            cause: BaseException | None = failure
            seen = 0
            while cause is not None and not isinstance(cause, AeforgeError) and seen < 10:
                # Ray wraps a worker's exception (UserExceptionWithTraceback._base_exc, RayTaskError.cause).
                cause = getattr(cause, "_base_exc", None) or getattr(cause, "cause", None) or cause.__cause__
                seen += 1
            if isinstance(cause, AeforgeError):
                return cause
    return exc


def fit(trainer):
    """``trainer.fit()`` (which raises on a failed run on Ray 2.60), showing a worker's own error (user_error); a
    fit aborted because the job was asked to stop raises KeyboardInterrupt, whatever Ray made of the abort."""
    from workers.tracking import STOP_REQUESTED

    try:
        result = trainer.fit()
    except Exception as exc:
        if STOP_REQUESTED.is_set():
            raise KeyboardInterrupt("job stopped") from exc
        shown = user_error(exc)
        if shown is exc:
            raise
        raise shown from exc
    if STOP_REQUESTED.is_set():
        raise KeyboardInterrupt("job stopped")
    return result
