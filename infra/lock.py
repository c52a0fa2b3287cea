"""The locks of the images' Python dependencies, generated from pyproject.toml.

    make lock                       # = python infra/lock.py: writes infra/requirements/{cpu,cuda,s3-standin,tools}.txt

One lock per image variant, every package pinned with its hashes (``pip install --require-hashes``), for Linux
x86_64 and Python 3.11, the images' platform, whatever machine writes them:

- ``cpu``: pyproject's dependencies and build requirements with torch pinned to its CPU build;
- ``cuda``: the same with torch pinned to the build the default index serves for Linux (a CUDA build, with the
  nvidia-* wheels it needs);
- ``s3-standin``: the ``cpu`` lock plus ``moto[server]`` (pyproject's test extra): the S3 server that stands in for
  MinIO where no image registry answers (infra/standins/);
- ``tools``: uv (UV_VERSION), which the image builds install the locks with.

Each lock's first line is a digest of what it was made from (pyproject's dependencies, build requirements,
requires-python and test extra's moto, and the variant's torch pin); tests/test_infra_lock.py recomputes it and fails
when pyproject changed without ``make lock``.

Where packages come from is the machine's own configuration, never a host named here: the default index (or
UV_INDEX_URL / UV_DEFAULT_INDEX), the CPU torch wheel from a folder (TORCH_CPU_FIND_LINKS, else pip's configured
find-links) or an index (TORCH_CPU_INDEX_URL), and the CUDA torch from TORCH_CUDA_INDEX_URL if set. TLS trusts the
system's certificate store (uv --native-tls), so a site's proxy certificate works as it does for pip.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = REPO / "pyproject.toml"
LOCK_DIR = REPO / "infra" / "requirements"
DIGEST_PREFIX = "# inputs-sha256: "
PYTHON_VERSION = "3.11"
PYTHON_PLATFORM = "x86_64-manylinux_2_28"  # torch 2.13's wheels are manylinux_2_28
UV_VERSION = "0.13.9"  # the tool that writes the locks, pinned like what it writes (make lock installs it)


@dataclass(frozen=True)
class Variant:
    name: str
    torch: str  # the variant's torch pin
    extras: tuple[str, ...] = ()  # requirements added to pyproject's (from its optional dependencies)
    constrained_by: str | None = None  # another variant's lock whose pins this one keeps

    @property
    def lock(self) -> Path:
        return LOCK_DIR / f"{self.name}.txt"


VARIANTS = {
    "cpu": Variant("cpu", torch="torch==2.13.0+cpu"),
    "cuda": Variant("cuda", torch="torch==2.13.0"),
    "s3-standin": Variant("s3-standin", torch="torch==2.13.0+cpu", extras=("moto",), constrained_by="cpu"),
}


def _pyproject() -> dict:
    return tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))


def extra_requirements(names: tuple[str, ...], project: dict | None = None) -> list[str]:
    """The test extra's requirements of the named distributions (e.g. ``moto[server]>=5.2.5`` for moto)."""
    project = project if project is not None else _pyproject()["project"]
    found = []
    for name in names:
        matches = [
            r
            for r in project.get("optional-dependencies", {}).get("test", [])
            if r.split("[")[0].split("=")[0].split(">")[0].split("<")[0].strip().lower() == name
        ]
        if not matches:
            raise SystemExit(f"pyproject.toml: the test extra has no {name!r} requirement, which the {name} lock needs")
        found.extend(matches)
    return found


def inputs_digest(variant: Variant, pyproject: dict | None = None) -> str:
    """sha256 of what the variant's lock is made from, in a canonical form (order and spacing of pyproject's lists
    do not matter; any change of a requirement does)."""
    data = pyproject if pyproject is not None else _pyproject()
    project = data["project"]
    inputs = {
        "requires-python": project.get("requires-python", ""),
        "build-system": sorted(data.get("build-system", {}).get("requires", [])),
        "dependencies": sorted(project.get("dependencies", [])),
        "extras": sorted(extra_requirements(variant.extras, project)),
        "torch": variant.torch,
        "python": [PYTHON_VERSION, PYTHON_PLATFORM],
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def recorded_digest(lock: Path) -> str | None:
    """The digest a lock's first line records, or None if it has none."""
    first = lock.read_text(encoding="utf-8").splitlines()[:1]
    return first[0][len(DIGEST_PREFIX) :].strip() if first and first[0].startswith(DIGEST_PREFIX) else None


def _pip_find_links() -> list[str]:
    """pip's configured find-links (PIP_FIND_LINKS, pip.conf): where this machine keeps wheels such as torch's CPU
    build."""
    try:
        out = subprocess.run(
            [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        out = ""
    links = [
        v
        for line in out.splitlines()
        if line.partition("=")[0].endswith("find-links")
        for v in line.partition("=")[2].strip().strip("'\"").split()
    ]
    env = os.environ.get("PIP_FIND_LINKS", "")
    return list(dict.fromkeys(env.split() + links))


# What every lock's `uv pip compile` says: hashes, the images' Python and platform, and how to regenerate it.
UV_COMPILE_FLAGS = [
    "--quiet",
    "--generate-hashes",
    "--native-tls",
    "--python-version",
    PYTHON_VERSION,
    "--python-platform",
    PYTHON_PLATFORM,
    "--custom-compile-command",
    "make lock",
]


def _run_uv_compile(cmd: list[str], lock: Path, digest: str) -> None:
    """Run ``cmd`` (pip's own settings left out: uv reads some PIP_ variables), then put ``digest`` on the lock's
    first line, where the staleness check reads it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    subprocess.run(cmd, check=True, env=env, cwd=REPO)
    text = lock.read_text(encoding="utf-8")
    lock.write_text(f"{DIGEST_PREFIX}{digest}\n" + text, encoding="utf-8")


def compile_lock(variant: Variant, uv: str = "uv") -> None:
    """Write the variant's lock with ``uv pip compile``, then put the inputs' digest on its first line."""
    data = _pyproject()
    # What the variant adds to pyproject's requirements, kept beside its lock (whose "via" comments name it).
    extra_in = LOCK_DIR / f"{variant.name}.in"
    extra_in.write_text(
        "\n".join(
            [variant.torch, *data["build-system"]["requires"], *extra_requirements(variant.extras, data["project"])]
        )
        + "\n"
    )
    cmd = [
        uv,
        "pip",
        "compile",
        "pyproject.toml",
        str(extra_in.relative_to(REPO)),
        *UV_COMPILE_FLAGS,
        "--no-strip-extras",
        "--output-file",
        str(variant.lock.relative_to(REPO)),
    ]
    if variant.constrained_by:
        cmd += ["--constraint", str(VARIANTS[variant.constrained_by].lock.relative_to(REPO))]
    if variant.torch.endswith("+cpu"):
        if os.environ.get("TORCH_CPU_INDEX_URL"):
            cmd += ["--extra-index-url", os.environ["TORCH_CPU_INDEX_URL"]]
        links = os.environ.get("TORCH_CPU_FIND_LINKS", "").split() or _pip_find_links()
        for link in links:
            cmd += ["--find-links", link]
    elif os.environ.get("TORCH_CUDA_INDEX_URL"):
        cmd += ["--extra-index-url", os.environ["TORCH_CUDA_INDEX_URL"]]
    _run_uv_compile(cmd, variant.lock, inputs_digest(variant, data))


# The installer the images' builds use (uv: parallel downloads and byte-compilation), pinned with its hashes too.
TOOLS_LOCK = LOCK_DIR / "tools.txt"


def tools_digest() -> str:
    return hashlib.sha256(
        json.dumps({"uv": UV_VERSION, "python": [PYTHON_VERSION, PYTHON_PLATFORM]}, sort_keys=True).encode()
    ).hexdigest()


def compile_tools_lock(uv: str = "uv") -> None:
    """infra/requirements/tools.txt: uv itself, for the image builds."""
    tools_in = LOCK_DIR / "tools.in"
    tools_in.write_text(f"uv=={UV_VERSION}\n")
    cmd = [
        uv,
        "pip",
        "compile",
        str(tools_in.relative_to(REPO)),
        *UV_COMPILE_FLAGS,
        "--output-file",
        str(TOOLS_LOCK.relative_to(REPO)),
    ]
    _run_uv_compile(cmd, TOOLS_LOCK, tools_digest())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", nargs="*", metavar="VARIANT", help=f"one of {', '.join(VARIANTS)} (default: all)")
    parser.add_argument("--uv", default="uv", help="the uv executable")
    parser.add_argument("--check", action="store_true", help="only say which locks are stale (exit 1 if any)")
    args = parser.parse_args(argv)
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant {unknown[0]!r}: choose from {', '.join(VARIANTS)}")
    args.variants = args.variants or list(VARIANTS)
    if args.check:
        stale = [v.name for v in map(VARIANTS.get, args.variants) if recorded_digest(v.lock) != inputs_digest(v)]
        if recorded_digest(TOOLS_LOCK) != tools_digest():
            stale.append("tools")
        print("stale: " + ", ".join(stale) if stale else "all locks are up to date")
        return 1 if stale else 0
    LOCK_DIR.mkdir(parents=True, exist_ok=True)
    # The constraining lock first (s3-standin keeps cpu's pins).
    for name in sorted(args.variants, key=lambda n: VARIANTS[n].constrained_by is not None):
        print(f"locking {name} -> {VARIANTS[name].lock.relative_to(REPO)}", flush=True)
        compile_lock(VARIANTS[name], uv=args.uv)
    print(f"locking tools -> {TOOLS_LOCK.relative_to(REPO)}", flush=True)
    compile_tools_lock(uv=args.uv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
