"""The registry's gate: whether a model is healthy, and whether an alias may move to a version.

An alias (``@candidate``, ``@best``) is what users load, so it moves only on purpose: when the spec or the command
asks for it **and** the version passes the gate:

1. it finished (its run was not failed or killed, its final evaluation is there);
2. it is healthy: its ranking metric is a finite number and, for the VAE family, it is not collapsed
   (``eval/collapsed``: no active unit, or too little KL per latent; see workers/metrics/active_units.py);
3. where the alias already points at another version, it is not worse than that version on the metric the spec
   ranks by, unless the command says ``--force``.

Otherwise the version is registered without the alias and the decision says why, in one line a person reads
("@candidate stays on v1: v3's eval/elbo -473.1 is worse than v1's -88.2"). This module decides from metrics
alone; jobs/registry.py reads them from MLflow and records the decision on the version.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

COLLAPSED = "eval/collapsed"
ACTIVE_UNITS = "eval/active_units"
KL = "eval/kl"
KL_PER_LATENT = "eval/kl_per_latent"


def number(value: float, digits: int = 4) -> str:
    """A metric as people read it: ``digits`` significant digits, and never ``-0``."""
    text = f"{float(value):.{digits}g}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class Health:
    """A model's verdict: ``healthy``, else ``reason`` says what is wrong, with the numbers."""

    healthy: bool
    reason: str = ""

    @property
    def label(self) -> str:
        """One word for a table's health column: healthy, collapsed, failed, running, no-metric."""
        if self.healthy:
            return "healthy"
        return self.reason.split(":", 1)[0].split(" ", 1)[0]


def health(metrics: Mapping[str, Any], metric: str | None = None, *, status: str = "finished") -> Health:
    """The health of a finished model from its final metrics (``eval/...``): ``status`` other than finished is
    unhealthy; so is a collapsed VAE-family model and a ranking ``metric`` that is missing or not finite."""
    if status.lower() != "finished":
        return Health(False, f"{status.lower()}: the run did not finish")
    if metrics.get(COLLAPSED) == 1:
        return Health(False, collapse_reason(metrics))
    if metric is not None and not _finite(metrics.get(metric)):
        value = metrics.get(metric)
        shown = "not reported" if value is None else f"{value} (not a finite number)"
        return Health(False, f"no-metric: {metric} is {shown}")
    return Health(True)


def collapse_reason(metrics: Mapping[str, Any]) -> str:
    """'collapsed: 0 active units, eval/kl 0.12 nats (0.02 per latent)': what the numbers of a collapse are."""
    parts = []
    if _finite(metrics.get(ACTIVE_UNITS)):
        units = int(metrics[ACTIVE_UNITS])
        parts.append(f"{units} active unit{'' if units == 1 else 's'}")
    if _finite(metrics.get(KL)):
        kl = f"eval/kl {number(metrics[KL], 2)} nats"
        if _finite(metrics.get(KL_PER_LATENT)):
            kl += f" ({number(metrics[KL_PER_LATENT], 2)} per latent)"
        parts.append(kl)
    return "collapsed: " + (", ".join(parts) if parts else "the posterior carries no information about the images")


def row_health(row: Mapping[str, Any], metric: str | None = None) -> Health:
    """A sweep trial's health from its results row (its status and final metrics)."""
    return health(row, metric, status=str(row.get("status") or "unknown"))


def is_worse(new: float, old: float, mode: str) -> bool:
    return new < old if mode == "max" else new > old


@dataclass(frozen=True)
class Incumbent:
    """The version an alias points at now, and its metrics (from its tags)."""

    version: str
    metrics: Mapping[str, Any]


@dataclass(frozen=True)
class AliasDecision:
    """Whether ``alias`` moves to ``version``, and the one line that says why (``message``)."""

    alias: str
    version: str
    moved: bool
    message: str
    compared_with: str | None = None  # the version compared against, None when there was none


def decide(
    alias: str,
    version: str,
    metrics: Mapping[str, Any],
    metric: str,
    mode: str,
    incumbent: Incumbent | None,
    *,
    force: bool = False,
    status: str = "finished",
) -> AliasDecision:
    """Whether ``@alias`` moves to ``version`` (whose final metrics are ``metrics``): it must be healthy, and not
    worse on ``metric`` (``mode`` max or min) than the version the alias points at now, unless ``force``."""
    verdict = health(metrics, metric, status=status)
    here = f"@{alias}"
    if incumbent is not None and str(incumbent.version) == str(version):
        return AliasDecision(alias, version, True, f"{here} is on v{version}", None)
    stays = f"{here} stays on v{incumbent.version}" if incumbent is not None else f"{here} is not set"
    if not verdict.healthy:
        return AliasDecision(
            alias,
            version,
            False,
            f"{stays}: v{version} is {verdict.reason}",
            None if incumbent is None else str(incumbent.version),
        )
    value = float(metrics[metric])
    if incumbent is None:
        return AliasDecision(alias, version, True, f"{here} moved to v{version} ({metric} {number(value)})", None)
    recorded = incumbent.metrics.get(metric)
    against = str(incumbent.version)
    if recorded is None or not _finite(recorded):
        return AliasDecision(
            alias,
            version,
            True,
            f"{here} moved from v{against} to v{version} ({metric} {number(value)}; v{against} has no {metric} "
            f"to compare)",
            against,
        )
    old = float(recorded)
    if is_worse(value, old, mode):
        if force:
            return AliasDecision(
                alias,
                version,
                True,
                f"{here} moved from v{against} to v{version} by --force: v{version}'s {metric} {number(value)} is "
                f"worse than v{against}'s {number(old)}",
                against,
            )
        return AliasDecision(
            alias,
            version,
            False,
            f"{stays}: v{version}'s {metric} {number(value)} is worse than v{against}'s {number(old)}"
            f" ({'higher' if mode == 'max' else 'lower'} is better; --force moves it anyway)",
            against,
        )
    return AliasDecision(
        alias,
        version,
        True,
        f"{here} moved from v{against} to v{version}: its {metric} {number(value)} is not worse than "
        f"v{against}'s {number(old)}",
        against,
    )
