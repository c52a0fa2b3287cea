"""The images' dependency locks (infra/requirements/*.txt, written by `make lock` = infra/lock.py): each records the
digest of what it was made from, so a change of pyproject's dependencies without a new lock fails here; every
requirement of pyproject is met by a pin, every pin has its hashes, and torch is pinned per variant."""

from __future__ import annotations

import copy
import importlib.util
import re
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("aeforge_infra_lock", REPO / "infra" / "lock.py")
lock = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = lock  # its dataclasses look their module up
_spec.loader.exec_module(lock)

# The images' platform: what the locks are resolved for, whatever machine runs this test.
IMAGE_ENV = {
    "python_version": "3.11",
    "python_full_version": "3.11.2",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "extra": "",
}
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==(\S+?)(\s*;.*)?\s*\\?$")


def pins(path: Path) -> dict[str, tuple[Version, int]]:
    """{package: (version, number of hashes)} of a lock file."""
    found: dict[str, tuple[Version, int]] = {}
    current = None
    for line in path.read_text(encoding="utf-8").splitlines():
        match = PIN.match(line)
        if match:
            current = canonicalize_name(match.group(1))
            found[current] = (Version(match.group(3)), 0)
        elif current and line.strip().startswith("--hash=sha256:"):
            version, hashes = found[current]
            found[current] = (version, hashes + 1)
    return found


@pytest.mark.parametrize("variant", list(lock.VARIANTS))
def test_lock_is_made_from_the_current_pyproject(variant):
    v = lock.VARIANTS[variant]
    assert v.lock.exists(), f"{v.lock} is missing: run `make lock`"
    assert lock.recorded_digest(v.lock) == lock.inputs_digest(v), (
        f"{v.lock.relative_to(REPO)} was made from other dependencies than pyproject.toml's: run `make lock`"
    )


@pytest.mark.parametrize("variant", list(lock.VARIANTS))
def test_every_requirement_is_met_by_a_hashed_pin(variant):
    v = lock.VARIANTS[variant]
    pinned = pins(v.lock)
    data = tomllib.loads(lock.PYPROJECT.read_text(encoding="utf-8"))
    wanted = [
        *data["project"]["dependencies"],
        *data["build-system"]["requires"],
        *lock.extra_requirements(v.extras, data["project"]),
        v.torch,
    ]
    for text in wanted:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate(IMAGE_ENV):
            continue
        name = canonicalize_name(req.name)
        assert name in pinned, f"{v.lock.name}: {req.name} (pyproject: {text!r}) is not pinned"
        assert req.specifier.contains(pinned[name][0], prereleases=True), (
            f"{v.lock.name}: {req.name}=={pinned[name][0]} does not meet {text!r}"
        )
    unhashed = sorted(name for name, (_, hashes) in pinned.items() if hashes == 0)
    assert unhashed == [], f"{v.lock.name}: pins without hashes: {unhashed}"


def test_torch_is_pinned_per_variant():
    cpu, cuda = pins(lock.VARIANTS["cpu"].lock), pins(lock.VARIANTS["cuda"].lock)
    assert str(cpu["torch"][0]) == "2.13.0+cpu"
    assert str(cuda["torch"][0]) == "2.13.0"
    assert not any(name.startswith("nvidia-") for name in cpu), "the CPU lock pulls CUDA libraries"
    assert any(name.startswith("nvidia-cudnn") for name in cuda), "the CUDA lock lacks cuDNN"
    # The stand-in's lock keeps every pin of the CPU lock (it installs on top of the CPU image).
    standin = pins(lock.VARIANTS["s3-standin"].lock)
    assert {k: v[0] for k, v in cpu.items()}.items() <= {k: v[0] for k, v in standin.items()}.items()


def test_a_changed_dependency_changes_the_digest():
    """The staleness check can fail: any edit of a requirement, an added or a removed one, gives another digest;
    reordering does not."""
    data = tomllib.loads(lock.PYPROJECT.read_text(encoding="utf-8"))
    variant = lock.VARIANTS["cpu"]
    base = lock.inputs_digest(variant, data)
    edits = []
    bumped = copy.deepcopy(data)
    bumped["project"]["dependencies"] = [
        d.replace("mlflow==3.17.2", "mlflow==3.17.3") for d in bumped["project"]["dependencies"]
    ]
    edits.append(bumped)
    added = copy.deepcopy(data)
    added["project"]["dependencies"].append("rich-click>=1")
    edits.append(added)
    removed = copy.deepcopy(data)
    removed["project"]["dependencies"].pop()
    edits.append(removed)
    build = copy.deepcopy(data)
    build["build-system"]["requires"] = ["setuptools>=70", "wheel"]
    edits.append(build)
    assert all(lock.inputs_digest(variant, edited) != base for edited in edits)
    reordered = copy.deepcopy(data)
    reordered["project"]["dependencies"].reverse()
    assert lock.inputs_digest(variant, reordered) == base
    assert lock.inputs_digest(lock.VARIANTS["cuda"], data) != base  # torch's pin is an input too


def test_no_lock_names_a_package_index():
    for path in (REPO / "infra" / "requirements").iterdir():
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"https?://|--(extra-)?index-url|--find-links|/opt/", text), path.name


def test_the_build_tools_lock_pins_uv_with_hashes():
    assert lock.recorded_digest(lock.TOOLS_LOCK) == lock.tools_digest(), "infra/requirements/tools.txt: run `make lock`"
    pinned = pins(lock.TOOLS_LOCK)
    assert pinned["uv"][0] == Version(lock.UV_VERSION) and pinned["uv"][1] > 0
