"""Retries with back-off (checkpoint uploads, pictures, MLflow calls from a Ray Train worker)."""

import pytest

from workers.outputs import with_retries


def test_a_failing_call_is_retried_with_growing_delays_then_succeeds():
    calls, sleeps = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise OSError("connection reset")
        return "ok"

    assert with_retries(flaky, "checkpoint upload", attempts=4, base_delay_s=1.0, sleep=sleeps.append) == "ok"
    assert len(calls) == 3 and len(sleeps) == 2
    assert 1.0 <= sleeps[0] <= 1.25 and 2.0 <= sleeps[1] <= 2.5  # exponential, with up to 25 % jitter


def test_the_last_failure_names_what_failed():
    sleeps = []

    def broken():
        raise OSError("bucket gone")

    with pytest.raises(RuntimeError, match=r"checkpoint upload to b/x failed after 3 attempts: bucket gone"):
        with_retries(broken, "checkpoint upload to b/x", attempts=3, sleep=sleeps.append)
    assert len(sleeps) == 2
