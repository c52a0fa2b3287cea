"""Stand-ins for Ray in the unit tests: a cluster of fixed size and a Jobs API kept in a dict."""

from __future__ import annotations

import threading

from services.dispatcher import LauncherUnavailable, RayJobInfo, SubmissionExists


class FakeCluster:
    def __init__(self, resources):
        self.resources = dict(resources)
        self.down = False

    def total_resources(self):
        if self.down:
            raise LauncherUnavailable("cluster down")
        return dict(self.resources)


class FakeLauncher:
    """Ray's Jobs API as a dict: submission id -> status, message, logs. Thread-safe."""

    def __init__(self):
        self.jobs: dict[str, dict] = {}
        self.submissions: list[tuple[str, str, dict]] = []
        self.specs: dict[str, str] = {}
        self.stops: list[str] = []
        self.down = False
        self.lock = threading.Lock()
        self.max_running = 0

    def _check(self):
        if self.down:
            raise LauncherUnavailable("Ray is down")

    def submit(self, submission_id, entrypoint, env_vars, spec_json):
        self._check()
        with self.lock:
            if submission_id in self.jobs:
                raise SubmissionExists(submission_id)
            self.jobs[submission_id] = {"status": "PENDING", "message": None, "logs": ""}
            self.submissions.append((submission_id, entrypoint, dict(env_vars)))
            self.specs[submission_id] = spec_json  # what the real launcher hands Ray as the job's spec package

    def info(self, submission_id):
        self._check()
        with self.lock:
            job = self.jobs.get(submission_id)
            return None if job is None else RayJobInfo(job["status"], job["message"])

    def stop(self, submission_id):
        self._check()
        with self.lock:
            self.stops.append(submission_id)
            if self.jobs[submission_id]["status"] in ("PENDING", "RUNNING"):
                self.jobs[submission_id]["status"] = "STOPPED"

    def logs(self, submission_id):
        self._check()
        with self.lock:
            return self.jobs.get(submission_id, {}).get("logs", "")

    async def tail(self, submission_id):
        """Like Ray's: the log as it grows, until the job has ended."""
        import asyncio

        sent = 0
        while True:
            with self.lock:
                job = self.jobs.get(submission_id, {"status": "FAILED", "logs": ""})
                logs, ended = job["logs"], job["status"] in ("STOPPED", "SUCCEEDED", "FAILED")
            if len(logs) > sent:
                yield logs[sent:]
                sent = len(logs)
            if ended:
                return
            await asyncio.sleep(0.05)

    # --- what the cluster does -------------------------------------------------------------------------------
    def set(self, submission_id, status, logs=None, message=None):
        with self.lock:
            job = self.jobs[submission_id]
            job["status"] = status
            job["message"] = message
            if logs is not None:
                job["logs"] = logs
            running = sum(1 for j in self.jobs.values() if j["status"] in ("PENDING", "RUNNING"))
            self.max_running = max(self.max_running, running)

    def forget(self, submission_id):
        with self.lock:
            del self.jobs[submission_id]
