"""The compose stack and the Containerfile, read as files (fast; `make test-stack` runs them): every service has a
health check and a restart policy and waits for what it needs to be healthy, image tags are pinned, state is in
named volumes, credentials arrive as secrets; the image is built from a base given as a build argument, runs
unprivileged, has a HEALTHCHECK, and installs the lock with hashes. No package index host is named."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
COMPOSE = yaml.safe_load((INFRA / "compose.yaml").read_text(encoding="utf-8"))
SERVICES = COMPOSE["services"]
ONE_SHOT = {"s3-setup"}


def test_every_service_is_health_checked_restarted_and_pinned():
    for name, service in SERVICES.items():
        image = service["image"]
        assert re.search(r":[^/:]+$", image.split(":-")[-1].rstrip("}")) and "latest" not in image, (name, image)
        assert service.get("restart") in ({"on-failure"} if name in ONE_SHOT else {"unless-stopped", "always"}), name
        check = service.get("healthcheck", {})
        if name in ONE_SHOT:
            continue
        # A shell string: podman-compose 1.0 misquotes the list form.
        assert isinstance(check.get("test"), str) and check["test"].strip(), name
        assert {"interval", "timeout", "retries", "start_period"} <= set(check), name


def test_services_wait_for_what_they_need():
    conditions = {
        name: {dep: spec["condition"] for dep, spec in s.get("depends_on", {}).items()} for name, s in SERVICES.items()
    }
    for name, deps in conditions.items():
        for dep, condition in deps.items():
            assert dep in SERVICES, (name, dep)
            expected = "service_completed_successfully" if dep in ONE_SHOT else "service_healthy"
            assert condition == expected, (name, dep, condition)
    assert set(conditions["aeforge"]) >= {"postgres", "mlflow", "ray-head", "s3-setup"}
    assert set(conditions["mlflow"]) >= {"postgres", "s3-setup"}
    assert conditions["ray-worker"] == {"ray-head": "service_healthy"}
    assert SERVICES["ray-worker"]["deploy"]["replicas"] == 2


def test_state_is_in_named_volumes_and_credentials_in_secrets():
    named = set(COMPOSE["volumes"])
    for name, service in SERVICES.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert source in named or source.startswith("./"), (name, volume)
        env = service.get("environment", {})
        if isinstance(env, dict):
            for key, value in env.items():
                # No S3 key or token in an environment; the database password only from infra/.env.
                assert not re.search(r"SECRET|ACCESS_KEY|TOKEN$", key) or key.endswith("_FILE"), (name, key)
                if "PASSWORD" in key and not key.endswith("_FILE"):
                    assert str(value).startswith("${POSTGRES_PASSWORD"), (name, key)
        for secret in service.get("secrets", []):
            assert secret in COMPOSE["secrets"], (name, secret)
    assert {"postgres", "s3", "aeforge-home"} <= named
    for secret in COMPOSE["secrets"].values():
        assert secret["file"].startswith("./secrets/"), secret  # git-ignored, written by stack.sh init
    gitignore = (REPO / ".gitignore").read_text(encoding="utf-8").split()
    assert {"infra/.env", "infra/tokens.yaml", "infra/secrets/"} <= set(gitignore)


def test_mlflow_allows_the_names_it_is_reached_by():
    command = SERVICES["mlflow"]["command"]
    hosts = re.search(r"--allowed-hosts (\S+)", command).group(1).split(",")
    assert {"mlflow", "mlflow:5000", "localhost:*", "127.0.0.1:*"} <= set(hosts)
    assert SERVICES["aeforge"]["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"


def test_containerfile_is_pinned_unprivileged_and_health_checked():
    text = (INFRA / "Containerfile").read_text(encoding="utf-8")
    assert re.search(r"^ARG BASE_IMAGE=\S+:\d[\w.-]*$", text, re.M)  # a pinned default, overridable
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", text, re.M)
    assert re.search(r"^USER aeforge$", text, re.M) and "useradd --uid 1000" in text
    assert re.search(r"^HEALTHCHECK .*\n?.*/healthz", text, re.M)
    assert "--require-hashes" in text and "--no-cache-dir" in text
    assert "infra/requirements/${VARIANT}.txt" in text
    # The lock's layer comes before the source's: a code change does not reinstall the dependencies.
    assert text.index("requirements/${VARIANT}.txt") < text.index("COPY services")


def test_no_package_index_host_is_named():
    hosts = re.compile(
        r"pypi\.org|pythonhosted|download\.pytorch\.org|deb\.debian\.org|files\.pythonhosted|"
        r"registry\.npmjs",
        re.I,
    )
    for path in [*INFRA.rglob("*"), REPO / "Makefile", REPO / ".dockerignore"]:
        if path.is_file() and "schemas" not in path.parts and path.suffix not in {".txt"}:
            assert not hosts.search(path.read_text(encoding="utf-8", errors="replace")), path
