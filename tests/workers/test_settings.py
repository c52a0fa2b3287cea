"""Settings read from the environment on a node (workers.settings): a bad value is refused with its variable's name."""

from __future__ import annotations

import pytest

from workers import settings
from workers.errors import AeforgeError


def test_the_stop_poll_interval_defaults_to_two_seconds_and_takes_a_positive_number(monkeypatch):
    monkeypatch.delenv("AEFORGE_STOP_POLL_S", raising=False)
    assert settings.stop_poll_s() == 2.0
    monkeypatch.setenv("AEFORGE_STOP_POLL_S", "0.25")
    assert settings.stop_poll_s() == 0.25
    for bad in ("0", "-1", "soon", "inf", "nan"):
        monkeypatch.setenv("AEFORGE_STOP_POLL_S", bad)
        with pytest.raises(AeforgeError, match=f"AEFORGE_STOP_POLL_S must be a number of seconds > 0, got '{bad}'"):
            settings.stop_poll_s()
