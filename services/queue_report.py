"""What ``GET /queue`` and ``aeforge queue`` show: per team and owner, what runs and what waits, what they hold
against their quota and their fair share, and each waiting job's place and reason.

Built from a store snapshot and, when the service knows the cluster, a fresh scheduling pass over it (the order
and reasons the dispatcher's next pass would give); without the cluster, from the reasons the last pass stored, in
priority then submission order.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from services.policy import QUOTA_RESOURCES, Policy
from services.scheduler import Plan, dominant_share
from services.store import QueueSnapshot


def queue_report(
    snapshot: QueueSnapshot,
    policy: Policy,
    *,
    plan: Plan | None,
    total: dict[str, float] | None,
    recent: dict[str, float] | None = None,
    policy_problem: str | None = None,
) -> dict[str, Any]:
    recent = recent or {}
    total = total or {}
    if plan is not None:
        order = list(plan.order)
        reasons = dict(plan.waits)
        reasons.update({s.job_id: f"starts next pass: {s.reason}" for s in plan.starts})
        reasons.update({job_id: f"will be refused: {why}" for job_id, why in plan.rejects.items()})
    else:
        ranked = sorted(snapshot.queued, key=lambda r: (-r.priority, r.seq))
        order = [r.id for r in ranked]
        reasons = {r.id: r.wait_reason or "" for r in snapshot.queued}
    place = {job_id: i + 1 for i, job_id in enumerate(order)}
    queued_by_id = {r.id: r for r in snapshot.queued}

    teams: dict[str, dict[str, Any]] = {}

    def team_entry(owner: str) -> dict[str, Any]:
        team = policy.team_of(owner)
        if team.name not in teams:
            teams[team.name] = {
                "team": team.name,
                "weight": team.weight,
                "quota": {k: team.quota.resource(v) for k, v in QUOTA_RESOURCES.items()} | {"jobs": team.quota.jobs},
                "borrowing_limit": None
                if team.borrowing_limit is None
                else {k: team.borrowing_limit.resource(v) for k, v in QUOTA_RESOURCES.items()}
                | {"jobs": team.borrowing_limit.jobs},
                "holds": {"cpu": 0.0, "gpu": 0.0, "jobs": 0},
                "recent_usage": round(recent.get(team.name, 0.0), 4),
                "running": 0,
                "waiting": 0,
                "owners": defaultdict(lambda: {"running": 0, "waiting": 0, "holds": {"cpu": 0.0, "gpu": 0.0}}),
            }
        return teams[team.name]

    running_out = []
    for job in snapshot.active:
        entry = team_entry(job.owner)
        holds = job.resources or {}
        entry["running"] += 1
        entry["holds"]["jobs"] += 1
        owner = entry["owners"][job.owner]
        owner["running"] += 1
        for key, ray_name in QUOTA_RESOURCES.items():
            entry["holds"][key] += float(holds.get(ray_name, 0.0))
            owner["holds"][key] += float(holds.get(ray_name, 0.0))
        running_out.append(
            {
                "id": job.id,
                "owner": job.owner,
                "team": entry["team"],
                "state": job.state,
                "priority_class": job.priority_class,
                "priority": job.priority,
                "holds": {k: float(holds.get(v, 0.0)) for k, v in QUOTA_RESOURCES.items()},
                "preempted_by": job.preempted_by,
            }
        )
    waiting_out = []
    team_places: dict[str, int] = defaultdict(int)
    for job_id in order:
        row = queued_by_id.get(job_id)
        if row is None:
            continue
        entry = team_entry(row.owner)
        entry["waiting"] += 1
        entry["owners"][row.owner]["waiting"] += 1
        team_places[entry["team"]] += 1
        waiting_out.append(
            {
                "id": row.id,
                "owner": row.owner,
                "team": entry["team"],
                "priority_class": row.priority_class,
                "priority": row.priority,
                "place": place[row.id],
                "place_in_team": team_places[entry["team"]],
                "asks": {k: float((row.resources or {}).get(v, 0.0)) for k, v in QUOTA_RESOURCES.items()},
                "reason": reasons.get(row.id) or None,
            }
        )
    for entry in teams.values():
        held = {ray: entry["holds"][key] for key, ray in QUOTA_RESOURCES.items()}
        entry["share"] = round(dominant_share(held, total), 4) if total else None
        entry["weighted_usage"] = (
            round(((entry["share"] or 0.0) + entry["recent_usage"]) / entry["weight"], 4) if total else None
        )
        entry["owners"] = [{"owner": name, **values} for name, values in sorted(entry["owners"].items())]
    return {
        "policy": {"source": policy.source, "problem": policy_problem},
        "cluster": total or None,
        "live": plan is not None,
        "teams": sorted(teams.values(), key=lambda t: t["team"]),
        "running": running_out,
        "waiting": waiting_out,
    }


def only_own_jobs(report: dict[str, Any], owner: str) -> dict[str, Any]:
    """A user's view: every team's totals, but only their own jobs listed."""
    out = dict(report)
    out["running"] = [j for j in report["running"] if j["owner"] == owner]
    out["waiting"] = [j for j in report["waiting"] if j["owner"] == owner]
    return out
