"""A job's states, in a module of their own: the CLI names them without importing the store (SQLAlchemy, the
metrics), which cost `aeforge jobs` most of its start."""

from __future__ import annotations

STATES = ("queued", "starting", "running", "succeeded", "failed", "cancelled")
# Admitted to the cluster (holding its resources); queued jobs are not.
ACTIVE_STATES = ("starting", "running")
TERMINAL_STATES = ("succeeded", "failed", "cancelled")
