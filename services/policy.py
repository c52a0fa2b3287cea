"""The queue policy the admins own: teams, their weights and quotas, and the priority classes jobs are submitted in.

A YAML file named by AEFORGE_POLICY_FILE, read again when it changes (as the token file is). Without one, every
owner is a team of its own, all weights are equal, nothing has a quota, and there is one class, ``normal``::

    half_life_hours: 24          # how fast a team's recent usage is forgotten (fair share, as Slurm's decay)
    preemption_min_run_minutes: 10   # a running job is preempted only after this long (no thrash)
    default_class: normal
    teams:
      vision:
        owners: [alice, bob]
        weight: 2                # twice the share of a weight-1 team
        quota: {cpu: 64, gpu: 8, jobs: 10}        # what it holds at most of its own (absent: no bound)
        borrowing_limit: {gpu: 4}                 # idle capacity it may hold beyond its quota (absent: any)
    default_team: {weight: 1}    # every owner no team names is a team of their own, with these settings
    classes:
      - {name: normal, value: 0}
      - {name: urgent, value: 100, preemptible: false, may_preempt: true, teams: [vision], roles: [admin]}

A class with neither ``teams`` nor ``roles`` is everyone's; otherwise a user may use it when their team or their
role is listed. Admins may use every class, and may still give a raw integer priority instead of a class.

A file that does not parse or validate (an unknown key, a quota below zero, a class naming an unknown team) is
refused with each field's path; the service keeps the last good policy, logs why, and ``aeforge doctor`` says so.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from services.settings import ROLES, Principal
from workers.errors import AeforgeError

log = logging.getLogger(__name__)

DEFAULT_CLASS = "normal"
DEFAULT_HALF_LIFE_HOURS = 24.0
DEFAULT_MIN_RUN_MINUTES = 10.0
# The resources a quota bounds, as the policy file names them and as Ray names them.
QUOTA_RESOURCES = {"cpu": "CPU", "gpu": "GPU"}


class PolicyError(AeforgeError):
    """A policy file that cannot be used; the message names the file and each field's path."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Limits(_Strict):
    """Concurrent CPU, GPU and jobs; an absent one is unbounded."""

    cpu: float | None = Field(None, ge=0)
    gpu: float | None = Field(None, ge=0)
    jobs: int | None = Field(None, ge=0)

    def resource(self, ray_name: str) -> float | None:
        """The bound on a Ray resource ("CPU", "GPU"), None when there is none."""
        for key, name in QUOTA_RESOURCES.items():
            if name == ray_name:
                return getattr(self, key)
        return None

    @property
    def bounded(self) -> bool:
        return any(v is not None for v in (self.cpu, self.gpu, self.jobs))


class TeamSettings(_Strict):
    weight: float = Field(1.0, gt=0)
    quota: Limits = Field(default_factory=Limits)
    # How much idle capacity beyond its quota the team may hold (Kueue's borrowingLimit); absent: any.
    borrowing_limit: Limits | None = None


class Team(TeamSettings):
    owners: list[str] = Field(default_factory=list)

    @field_validator("owners")
    @classmethod
    def _distinct(cls, owners: list[str]) -> list[str]:
        for owner in owners:
            if not owner or len(owner) > 100:
                raise ValueError(f"an owner must be 1 to 100 characters, got {owner!r}")
        if len(set(owners)) != len(owners):
            raise ValueError("an owner is listed twice")
        return owners


class PriorityClass(_Strict):
    name: str = Field(..., min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    value: int = Field(0, ge=-1000, le=1000)
    preemptible: bool = True
    may_preempt: bool = False
    teams: list[str] = Field(default_factory=list)
    roles: list[str] = Field(default_factory=list)

    @field_validator("roles")
    @classmethod
    def _known_roles(cls, roles: list[str]) -> list[str]:
        unknown = [r for r in roles if r not in ROLES]
        if unknown:
            raise ValueError(f"unknown role(s) {', '.join(unknown)}; roles are {', '.join(ROLES)}")
        return roles


class PolicyFile(_Strict):
    """The file as written; :class:`Policy` is what the service uses."""

    half_life_hours: float = Field(DEFAULT_HALF_LIFE_HOURS, gt=0)
    preemption_min_run_minutes: float = Field(DEFAULT_MIN_RUN_MINUTES, ge=0)
    default_class: str = DEFAULT_CLASS
    teams: dict[str, Team] = Field(default_factory=dict)
    default_team: TeamSettings = Field(default_factory=TeamSettings)
    classes: list[PriorityClass] = Field(default_factory=lambda: [PriorityClass(name=DEFAULT_CLASS)])

    @field_validator("teams")
    @classmethod
    def _team_names(cls, teams: dict[str, Team]) -> dict[str, Team]:
        for name in teams:
            if not name or name.startswith("@") or len(name) > 100:
                raise ValueError(f"team name {name!r}: 1 to 100 characters, not starting with @")
        return teams

    @model_validator(mode="after")
    def _consistent(self) -> PolicyFile:
        names = [c.name for c in self.classes]
        if not names:
            raise ValueError("classes: at least one priority class is needed")
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"classes: class(es) {', '.join(duplicated)} defined twice")
        if self.default_class not in names:
            raise ValueError(f"default_class: {self.default_class!r} is not a class; classes are {', '.join(names)}")
        for i, klass in enumerate(self.classes):
            unknown = [t for t in klass.teams if t not in self.teams]
            if unknown:
                raise ValueError(
                    f"classes.{i}.teams: unknown team(s) {', '.join(unknown)}; "
                    f"teams are {', '.join(self.teams) or '(none)'}"
                )
        seen: dict[str, str] = {}
        for team_name, team in self.teams.items():
            for owner in team.owners:
                if owner in seen:
                    raise ValueError(f"teams.{team_name}.owners: {owner!r} is already in team {seen[owner]}")
                seen[owner] = team_name
        return self


@dataclass(frozen=True)
class TeamView:
    """A team as the scheduler sees it (a named team, or the team of one owner no team names: ``@owner``)."""

    name: str
    weight: float
    quota: Limits
    borrowing_limit: Limits | None

    def ceiling(self, ray_name: str) -> float | None:
        """The most of a resource the team may hold with borrowing: quota + borrowing limit (None: unbounded)."""
        quota = self.quota.resource(ray_name) if ray_name in QUOTA_RESOURCES.values() else None
        if quota is None:
            return None
        if self.borrowing_limit is None:
            return None
        extra = self.borrowing_limit.resource(ray_name)
        return None if extra is None else quota + extra

    def jobs_ceiling(self) -> int | None:
        if self.quota.jobs is None or self.borrowing_limit is None or self.borrowing_limit.jobs is None:
            return None
        return self.quota.jobs + self.borrowing_limit.jobs


@dataclass(frozen=True)
class Policy:
    spec: PolicyFile = field(default_factory=PolicyFile)
    source: str = "the default policy (no AEFORGE_POLICY_FILE)"
    # Lookups made once from ``spec``: each owner's team name, each class by name.
    _owner_team: dict[str, str] = field(init=False, repr=False, compare=False)
    _classes: dict[str, PriorityClass] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        owner_team = {owner: name for name, team in self.spec.teams.items() for owner in team.owners}
        object.__setattr__(self, "_owner_team", owner_team)
        object.__setattr__(self, "_classes", {c.name: c for c in self.spec.classes})

    @property
    def half_life_s(self) -> float:
        return self.spec.half_life_hours * 3600.0

    @property
    def min_run_s(self) -> float:
        return self.spec.preemption_min_run_minutes * 60.0

    @property
    def default_class(self) -> PriorityClass:
        return self._classes[self.spec.default_class]

    def team_of(self, owner: str) -> TeamView:
        name = self._owner_team.get(owner)
        settings: TeamSettings = self.spec.default_team if name is None else self.spec.teams[name]
        return TeamView(
            name=f"@{owner}" if name is None else name,
            weight=settings.weight,
            quota=settings.quota,
            borrowing_limit=settings.borrowing_limit,
        )

    def priority_class(self, name: str | None) -> PriorityClass | None:
        """The class of that name (the default for None); None for a name the policy does not define (a class
        removed since the job was queued: the scheduler then treats the job as of the default class)."""
        return self.default_class if name is None else self._classes.get(name)

    def allowed_classes(self, who: Principal) -> list[PriorityClass]:
        team = self._owner_team.get(who.owner)
        return [
            c
            for c in self.spec.classes
            if who.is_admin or not (c.teams or c.roles) or (team is not None and team in c.teams) or who.role in c.roles
        ]

    @property
    def classes(self) -> list[PriorityClass]:
        return list(self.spec.classes)


def never_fits_team(team: TeamView, asked: dict[str, float]) -> str | None:
    """Why a job asking for ``asked`` can never run within its team's quota plus borrowing limit (None: it can)."""
    for ray_name in QUOTA_RESOURCES.values():
        ceiling = team.ceiling(ray_name)
        if ceiling is not None and asked.get(ray_name, 0.0) > ceiling + 1e-9:
            quota = team.quota.resource(ray_name) or 0.0  # set: a ceiling is a quota plus a borrowing limit
            return (
                f"it asks for {ray_name} {asked[ray_name]:g} but team {team.name} may hold at most {ceiling:g} "
                f"(quota {quota:g} plus borrowing limit {ceiling - quota:g})"
            )
    jobs = team.jobs_ceiling()
    if jobs is not None and jobs < 1:
        return f"team {team.name} may run no job (its jobs quota plus borrowing limit is 0)"
    return None


def parse_policy(text: str, source: str) -> Policy:
    """A Policy from the YAML ``text``; PolicyError naming ``source`` and each field's path."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PolicyError(f"{source}: not YAML: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PolicyError(f"{source}: a policy file is a mapping (teams, classes, default_class, ...)")
    try:
        spec = PolicyFile.model_validate(data)
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            loc = ".".join(str(p) for p in error.get("loc", ())) or "<policy>"
            msg = str(error.get("msg", "")).removeprefix("Value error, ")
            lines.append(f"{loc}: {msg}")
        raise PolicyError(f"{source}: invalid queue policy:\n  " + "\n  ".join(lines)) from None
    return Policy(spec=spec, source=source)


def load_policy_file(path: Path) -> Policy:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read the policy file: {exc.strerror or exc}") from None
    return parse_policy(text, str(path))


class PolicySource:
    """The policy in force: the file's as it is now, read again when it changes (by stat). A file that stops being
    valid leaves the last good policy in force; ``problem`` says why until the file is good again."""

    def __init__(self, path: Path | None):
        self.path = None if path is None else Path(path).expanduser()
        self._lock = threading.Lock()
        self._stamp: tuple | None = None
        self._policy = Policy()
        self.problem: str | None = None
        if self.path is not None:
            # The first read must succeed: a service does not start on a policy it cannot use.
            self._policy = load_policy_file(self.path)
            self._stamp = self._stat()

    def _stat(self) -> tuple | None:
        if self.path is None:
            return None
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def current(self) -> Policy:
        if self.path is None:
            return self._policy
        stamp = self._stat()
        with self._lock:
            if stamp == self._stamp:
                return self._policy
            self._stamp = stamp
            try:
                self._policy = load_policy_file(self.path)
            except PolicyError as exc:
                self.problem = f"{exc}\n(still using the last good policy, read from {self._policy.source})"
                log.error("queue policy refused: %s", self.problem)
            else:
                if self.problem is not None:
                    log.info("queue policy %s is valid again", self.path)
                else:
                    log.info("queue policy %s read again", self.path)
                self.problem = None
            return self._policy


def describe_policy(policy: Policy) -> str:
    """One line for ``doctor``: where the policy comes from, its teams and classes."""
    classes = ", ".join(f"{c.name}={c.value}" for c in policy.classes)
    teams = ", ".join(policy.spec.teams) or "one per owner"
    return f"{policy.source}: teams {teams}; classes {classes} (default {policy.spec.default_class})"
