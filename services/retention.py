"""Bounded growth: finished jobs older than AEFORGE_RETENTION_DAYS are deleted with their events (off by default).

The service runs :meth:`Retention.run` in a thread. Each pass deletes in small batches (:meth:`Store.purge_finished`:
one short transaction each, without the admission lock) with a pause between them, so the dispatcher's passes and
submissions go on while a backlog of a million old jobs drains. With an archive folder
(AEFORGE_RETENTION_ARCHIVE_DIR) each batch is first appended to ``jobs-YYYY-MM-DD.jsonl`` there (the job with its
spec and its events, one JSON object per line, flushed to disk): if that write fails, nothing is deleted.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from datetime import datetime, timedelta
from pathlib import Path

from services import metrics
from services.store import Event, Job, Store, utcnow

log = logging.getLogger(__name__)


class Retention:
    def __init__(
        self,
        store: Store,
        days: float,
        *,
        batch: int = 500,
        pause_s: float = 0.05,
        interval_s: float = 600.0,
        archive_dir: Path | None = None,
    ):
        if days <= 0:
            raise ValueError(f"AEFORGE_RETENTION_DAYS must be positive, got {days}")
        self.store = store
        self.keep = timedelta(days=days)
        self.batch = batch
        self.pause_s = pause_s
        self.interval_s = interval_s
        self.archive_dir = archive_dir

    def run_once(self, stop: threading.Event | None = None, now: datetime | None = None) -> int:
        """Delete every job that finished more than the retention age ago, a batch at a time; returns how many."""
        cutoff = (now or utcnow()) - self.keep
        archive = self._archive if self.archive_dir is not None else None
        deleted = 0
        while stop is None or not stop.is_set():
            count = self.store.purge_finished(cutoff, batch=self.batch, before_delete=archive)
            deleted += count
            metrics.PURGED.inc(count)
            if count < self.batch:
                break
            if stop is not None:
                stop.wait(self.pause_s)
        if deleted:
            log.info("retention: deleted %d jobs that finished before %s", deleted, cutoff.isoformat())
        return deleted

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.run_once(stop)
            except Exception:
                log.exception("retention pass failed; trying again in %.0f s", self.interval_s)
            stop.wait(self.interval_s)

    def _archive(self, batch: list[tuple[Job, list[Event]]]) -> None:
        assert self.archive_dir is not None
        self.archive_dir.mkdir(parents=True, exist_ok=True)
        path = self.archive_dir / f"jobs-{utcnow():%Y-%m-%d}.jsonl"
        with open(path, "a", encoding="utf-8") as out:
            for job, events in batch:
                record = {"job": job.to_dict(include_spec=True), "events": [e.to_dict() for e in events]}
                out.write(json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n")
            out.flush()
            os.fsync(out.fileno())
