"""The one writer of a run's final outputs, and the retry rule for every upload a run makes.

A run (a train job, a sweep trial, a sweep's summary) ends with a local folder that holds its outputs as they should
appear: ``metrics.json``, ``pictures/``, ``results/``. :func:`publish_outputs` writes ``metrics.json`` there and
then copies the folder to wherever this run's outputs belong: storage under ``runs/<run name>/`` and the MLflow run
(each sub-folder as an artifact folder of the same name).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:  # for the annotations only: both import this module's helpers
    from workers.storage import Storage
    from workers.tracking import MlflowRun

T = TypeVar("T")
METRICS_FILE = "metrics.json"


def numeric_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The entries that are numbers (bools are not metrics), as Ray Train reports and MLflow logs them."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def with_retries(
    fn: Callable[[], T],
    what: str,
    attempts: int = 4,
    base_delay_s: float = 1.0,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Call fn, retrying with exponential back-off and jitter; the last failure is raised with ``what`` named."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:  # storage errors come in many types (OSError, botocore, pyarrow)
            if attempt == attempts:
                raise RuntimeError(f"{what} failed after {attempts} attempts: {exc}") from exc
            delay = base_delay_s * 2 ** (attempt - 1) * (1 + 0.25 * random.random())
            print(
                f"aeforge: {what} failed (attempt {attempt}/{attempts}: {exc}); retrying in {delay:.1f} s", flush=True
            )
            sleep(delay)
    raise AssertionError("unreachable")


def write_json_atomic(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True))
    tmp.replace(path)


def publish_outputs(
    local_dir: Path,
    *,
    metrics: Mapping[str, float] | None = None,
    storage: Storage | None = None,
    run_name: str | None = None,
    mlflow_run: MlflowRun | None = None,
) -> None:
    """Write ``metrics`` as ``local_dir/metrics.json`` (when given), then upload every file of ``local_dir`` to
    ``storage`` under ``runs/<run_name>/`` (same relative paths) and every sub-folder to ``mlflow_run`` as an
    artifact folder of the same name. Each upload is retried (:func:`with_retries`)."""
    local_dir = Path(local_dir)
    if metrics is not None:
        write_json_atomic(local_dir / METRICS_FILE, dict(metrics))
    if not local_dir.is_dir():
        return
    if mlflow_run is not None:
        for folder in sorted(p for p in local_dir.iterdir() if p.is_dir() and any(p.iterdir())):
            with_retries(partial(mlflow_run.log_artifacts, folder, folder.name), f"MLflow upload of {folder.name}/")
    if storage is not None:
        if not run_name:
            raise ValueError("publish_outputs: a storage destination needs the run's name")
        for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
            relpath = f"runs/{run_name}/{path.relative_to(local_dir).as_posix()}"
            with_retries(partial(storage.put_file, path, relpath), f"upload of {relpath}")
