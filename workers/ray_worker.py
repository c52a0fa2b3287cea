"""What runs on each Ray Train worker: the training loop of workers/loop.py, unchanged, in a Ray Train context.

Rank 0 (the chief) sends curves and evaluation results to MLflow itself (Train V2 keeps metrics only with
checkpoints), writes the pictures, and puts the final model files in the last checkpoint. Every rank reads its own
shard of the training set; the beta-TCVAE estimator gathers the posterior parameters of the global batch.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from workers import settings
from workers.loop import RunContext, is_checkpoint, total_steps, train
from workers.outputs import numeric_metrics, publish_outputs, with_retries
from workers.timeline import Timeline

if TYPE_CHECKING:
    from workers.tracking import MlflowRun

CHECKPOINT_DIR = re.compile(r"checkpoint_step_(\d+)$")


@dataclass(frozen=True)
class WorkerJob:
    """What a worker is given: the job's spec as the typed object the driver parsed (anything with ``model``,
    ``data``, ``train`` and ``eval`` sections: a ``jobs.spec.JobSpec``), the run's name (job or trial id), and
    where its MLflow run is; for a sweep's trial, its run name (``trial``), which its progress lines carry.
    ``stop_on``: the name whose stop request (:func:`stop_request_path`) ends the run early; None: its own."""

    spec: Any
    run_name: str
    mlflow_run_id: str | None
    mlflow_tracking_uri: str
    trial: str | None = None
    stop_on: str | None = None


# The object a driver writes to ask its training to stop (preemption, a cancel): STOP_REQUESTS/<run name>.
STOP_REQUESTS = "stop-requests"


def stop_request_path(run_name: str) -> str:
    return f"{STOP_REQUESTS}/{run_name}"


def _watch_for_stop(check: Callable[[], bool], seen: threading.Event, poll_s: float) -> None:
    while not seen.is_set():
        try:
            if check():
                seen.set()
                return
        except Exception:  # storage unreachable for a moment: ask again; a stop is never invented
            pass
        time.sleep(poll_s)


def _all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Differentiable all-gather of equal-sized local batches, concatenated in rank order."""
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(t), dim=0)


class RayTrainContext(RunContext):
    """RunContext on a Ray Train worker: checkpoints through ray.train.report, metrics to MLflow from rank 0."""

    def __init__(
        self,
        *,
        mlflow_run=None,
        run_dir: Path | None,
        gather_tc: bool,
        trial: str | None = None,
        timeline: Timeline | None = None,
        stop_check: Callable[[], bool] | None = None,
    ):
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        device = ray.train.torch.get_device()
        world_size = context.get_world_size()
        distributed = world_size > 1 and dist.is_available() and dist.is_initialized()

        def wrap(module):
            if not distributed:
                return module
            ids = [device] if device.type == "cuda" else None
            return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids)

        super().__init__(
            rank=context.get_world_rank(),
            world_size=world_size,
            device=device,
            wrap=wrap,
            gather=_all_gather_cat if (distributed and gather_tc) else None,
            run_dir=run_dir,
            trial=trial,
            timeline=timeline or Timeline(),
        )
        self._mlflow = mlflow_run
        self._restored: tempfile.TemporaryDirectory | None = None
        self.resumed_from_step: int | None = None
        # On a resume, the last step the earlier attempt already logged to MLflow: the steps between the
        # checkpoint and it are trained again (to the same values) but not logged twice.
        self._logged_through = -1
        self._distributed = distributed
        # A stop request is looked for by a thread of its own (storage may take a while to answer), never by a
        # training step; each rank's view is then agreed on at the same step (stop_requested).
        self._stop_seen = threading.Event()
        if stop_check is not None:
            poll_s = settings.stop_poll_s()  # read here: a bad value fails the run, not the watching thread
            threading.Thread(
                target=_watch_for_stop,
                args=(stop_check, self._stop_seen, poll_s),
                name="aeforge-stop-watch",
                daemon=True,
            ).start()

    def stop_requested(self) -> bool:
        """Whether any rank has seen the stop request: every rank calls this at the same step, so all stop there."""
        seen = self._stop_seen.is_set()
        if not self._distributed:
            return seen
        flag = torch.tensor([1.0 if seen else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def latest_checkpoint(self) -> Path | None:
        """The run's last checkpoint (Ray Train's, from this attempt or an earlier fit under the same run name),
        downloaded to a local folder; None on a fresh start."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        restored = self._restored = tempfile.TemporaryDirectory(prefix="aeforge-restore-")
        with_retries(lambda: checkpoint.to_directory(restored.name), f"download of checkpoint {checkpoint.path}")
        if not is_checkpoint(Path(restored.name)):
            return None
        found = CHECKPOINT_DIR.search(checkpoint.path.rstrip("/"))
        if found is not None:
            self.resumed_from_step = int(found.group(1))
            if self.is_chief:
                print(f"aeforge: resuming from {checkpoint.path} (step {self.resumed_from_step})", flush=True)
                if self._mlflow is not None:
                    # A trace on the MLflow run of every resumption: value and step are the step resumed from.
                    self._mlflow.log_metrics({"resume/from_step": self.resumed_from_step}, self.resumed_from_step)
                    history = self._mlflow.client.get_metric_history(self._mlflow.run_id, "train/loss")
                    self._logged_through = max((m.step for m in history), default=-1)
        return Path(restored.name)

    def save_checkpoint(self, directory: Path, metrics: dict[str, float], step: int, keep: int) -> None:
        """Every rank reports (a barrier); the chief's report carries the checkpoint, uploaded with retries and
        back-off into the Train run's folder as checkpoint_step_<step>. ``keep`` is CheckpointConfig's business."""
        import pyarrow.fs
        import ray.train

        def upload(checkpoint: ray.train.Checkpoint, dir_name: str) -> ray.train.Checkpoint:
            storage = ray.train.get_context().get_storage()
            fs = storage.storage_filesystem
            destination = f"{storage.experiment_fs_path}/{dir_name}"

            def copy() -> None:
                fs.create_dir(destination)
                pyarrow.fs.copy_files(
                    checkpoint.path, destination, source_filesystem=checkpoint.filesystem, destination_filesystem=fs
                )

            with_retries(copy, f"checkpoint upload to {destination}")
            return ray.train.Checkpoint(path=destination, filesystem=fs)

        reported = numeric_metrics(metrics)
        reported["step"] = step
        if self.is_chief:
            checkpoint = ray.train.Checkpoint.from_directory(str(directory))
            ray.train.report(
                reported,
                checkpoint=checkpoint,
                checkpoint_dir_name=f"checkpoint_step_{step:09d}",
                checkpoint_upload_fn=upload,
            )
        else:
            ray.train.report(reported, checkpoint=None)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        super().log_metrics(metrics, step)
        if self.is_chief and self._mlflow is not None and step > self._logged_through:
            with_retries(lambda: self._mlflow.log_metrics(metrics, step), "MLflow metrics", attempts=3)


def train_loop_per_worker(config: dict[str, WorkerJob]) -> dict[str, Any] | None:
    """The Ray Train entry; ``config["job"]`` is the :class:`WorkerJob`.

    Returns (rank 0; Ray Train hands it to the driver as ``Result.return_value``) the steps trained, the step this
    attempt resumed from (0 on a fresh start), the final metrics, and the chief's timeline (where its time went).
    """
    import ray.train

    from workers.data import prepare, shard
    from workers.storage import Storage

    timeline = Timeline()
    job = config["job"]
    spec = job.spec
    storage = Storage.from_settings()
    chief = ray.train.get_context().get_world_rank() == 0
    mlflow_run = None
    if chief and job.mlflow_run_id:
        # MLflow (2.3 s to import and make a client on a 2-core worker) only where metrics are sent from: the other
        # ranks never import it. (Connecting on a thread meanwhile saved nothing: the import holds the GIL that the
        # data and model set-up need, and they took as much longer.)
        from workers.tracking import MlflowRun

        mlflow_run = MlflowRun(job.mlflow_run_id, job.mlflow_tracking_uri)
        timeline.mark("mlflow client")
    run_dir = Path(tempfile.mkdtemp(prefix=f"aeforge-{job.run_name}-"))
    try:
        ctx = RayTrainContext(
            mlflow_run=mlflow_run,
            run_dir=run_dir,
            gather_tc=spec.model.gather_global_batch,
            trial=job.trial,
            timeline=timeline,
            stop_check=lambda: storage.exists(stop_request_path(job.stop_on or job.run_name)),
        )
        ctx.log_phase("loading data")
        data = prepare(spec.data, spec.train.seed, resolve=storage.resolve)
        local_shard = shard(data.train, ctx.rank, ctx.world_size, spec.train.seed)
        timeline.mark("data")
        result = train(
            spec.model,
            spec.train,
            spec.eval,
            local_shard,
            data.val,
            ctx,
            dataset_size=len(data.train),
            full_data=data.ground_truth,
            spec_json=spec.model_dump_json(),
        )
        if not ctx.is_chief:
            return None
        if result.stopped_at_step is not None:  # asked to stop: checkpointed at this step, nothing to publish
            return {
                "steps": result.steps,
                "resumed_from_step": result.resumed_from_step,
                "stopped_at_step": result.steps,
            }
        final = numeric_metrics(result.final_metrics)
        publish_outputs(run_dir, metrics=final, storage=storage, run_name=job.run_name, mlflow_run=mlflow_run)
        timeline.mark("outputs")
        return {
            "steps": result.steps,
            "resumed_from_step": result.resumed_from_step,
            "images_per_second": result.images_per_second,
            "final_metrics": final,
            "pictures": sorted(result.pictures),
            "timeline": timeline.to_dict(),
        }
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


@dataclass(frozen=True)
class PackWorkerJob:
    """What a worker is given for a pack of sweep trials (workers/pack.py): the sweep's spec (its data, train and
    eval sections are every member's), the pack's Train run name, the tracking URI, and per member (``members``,
    in pack order) its trial spec (``spec``: model settings and seed), run name (``name``), own job id (``job``:
    its folder on storage) and MLflow run id (``mlflow_run_id``). ``stop_on``: the name whose stop request ends the
    pack early (its sweep's job id); None: its own run name."""

    spec: Any
    run_name: str
    members: list[dict[str, Any]]
    mlflow_tracking_uri: str
    stop_on: str | None = None


def pack_loop_per_worker(config: dict[str, PackWorkerJob]) -> dict[str, Any] | None:
    """The Ray Train entry of a pack: train_pack on this worker, each member's curves to its own MLflow run, and
    each finished member's outputs (metrics.json, pictures) to storage under runs/<member job>/ and to its run.

    The members share the sweep's train/validation split (drawn with the sweep's train.seed); each member's seed
    sets its initial weights, data order and noise. Returns (rank 0) per member whether it failed (step, part) and
    its final metrics, and the chief's timeline; a pack asked to stop returns the step it checkpointed at
    (``stopped_at_step``) instead of its members."""
    import ray.train

    from workers.data import prepare, shard
    from workers.pack import PackMember, member_folder, train_pack
    from workers.storage import Storage

    timeline = Timeline()
    job = config["job"]
    spec = job.spec
    storage = Storage.from_settings()
    chief = ray.train.get_context().get_world_rank() == 0
    runs: list[MlflowRun] = []  # the chief's: only it logs to MLflow
    logged_through: list[int] = []
    if chief:
        from workers.tracking import MlflowRun

        runs = [MlflowRun(m["mlflow_run_id"], job.mlflow_tracking_uri) for m in job.members]
        # After a restart (a worker died), the steps between the pack's checkpoint and what an earlier attempt
        # logged are trained again to the same values but not logged twice.
        logged_through = [
            max((m.step for m in run.client.get_metric_history(run.run_id, "train/loss")), default=-1) for run in runs
        ]
        timeline.mark("mlflow client")
    run_dir = Path(tempfile.mkdtemp(prefix=f"aeforge-{job.run_name}-"))
    try:
        ctx = RayTrainContext(
            mlflow_run=None,
            run_dir=run_dir,
            gather_tc=spec.model.gather_global_batch,
            timeline=timeline,
            stop_check=lambda: storage.exists(stop_request_path(job.stop_on or job.run_name)),
        )
        ctx.log_phase("loading data")
        data = prepare(spec.data, spec.train.seed, resolve=storage.resolve)
        local_shard = shard(data.train, ctx.rank, ctx.world_size, spec.train.seed)
        timeline.mark("data")
        members = [PackMember(m["spec"].model, m["spec"].train.seed, m["name"]) for m in job.members]

        def log(k: int, metrics: dict[str, float], step: int) -> None:
            if step > logged_through[k] or not any(name.startswith("train/") for name in metrics):
                with_retries(lambda: runs[k].log_metrics(metrics, step), "MLflow metrics", attempts=3)

        results = train_pack(
            members,
            spec.train,
            spec.eval,
            local_shard,
            data.val,
            ctx,
            dataset_size=len(data.train),
            full_data=data.ground_truth,
            spec_jsons=[m["spec"].model_dump_json() for m in job.members],
            log=log if chief else None,
        )
        if not chief:
            return None
        stopped = {r.stopped_at_step for r in results} - {None}
        if stopped:  # asked to stop: checkpointed at this step, no member finished, nothing to publish
            return {"stopped_at_step": stopped.pop(), "timeline": timeline.to_dict()}
        summaries = []
        for k, (member, result) in enumerate(zip(job.members, results)):
            final = numeric_metrics(result.final_metrics)
            if result.failed is None:
                folder = run_dir / member_folder(k)
                folder.mkdir(parents=True, exist_ok=True)
                publish_outputs(folder, metrics=final, storage=storage, run_name=member["job"], mlflow_run=runs[k])
            summaries.append(
                {
                    "failed": list(result.failed) if result.failed else None,
                    "final_metrics": final,
                    "resumed_from_step": result.resumed_from_step,
                    "steps": total_steps(spec.train, len(local_shard)),
                }
            )
        timeline.mark("outputs")
        return {"members": summaries, "timeline": timeline.to_dict()}
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
