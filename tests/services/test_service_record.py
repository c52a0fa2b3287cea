"""`aeforge serve --port P` and the CLI agree without AEFORGE_API_URL: the service records its address in
AEFORGE_HOME/service.json while it listens (services.api.run_service), and the client settings read it
(services.settings.api_url_for); AEFORGE_API_URL still wins, and a stale record is passed over with a message."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from services import settings as settings_module
from services.client import AeforgeClient, ApiError
from services.settings import (
    DEFAULT_API_URL,
    ServiceSettings,
    api_url_for,
    read_service_record,
    remove_service_record,
    service_record_path,
    url_for_listener,
    write_service_record,
)
from tests.fixtures.processes import stop, wait_for

REPO = Path(__file__).resolve().parents[2]


def exited_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- the record and how the client settings read it ---------------------------------------------------------


def test_a_live_record_gives_the_url_and_an_explicit_variable_still_wins(tmp_path):
    write_service_record(tmp_path, "http://127.0.0.1:8123")
    record = json.loads(service_record_path(tmp_path).read_text())
    assert record["url"] == "http://127.0.0.1:8123" and record["pid"] == os.getpid()
    assert oct(service_record_path(tmp_path).stat().st_mode & 0o777) == "0o600"
    settings = ServiceSettings.load({"AEFORGE_HOME": str(tmp_path)})
    assert settings.api_url == "http://127.0.0.1:8123" and "service.json" in settings.api_url_source
    explicit = ServiceSettings.load({"AEFORGE_HOME": str(tmp_path), "AEFORGE_API_URL": "https://queue.example.org/"})
    assert explicit.api_url == "https://queue.example.org" and explicit.api_url_source == "AEFORGE_API_URL"


def test_a_stale_or_foreign_or_broken_record_is_passed_over_saying_why(tmp_path):
    write_service_record(tmp_path, "http://127.0.0.1:8123", pid=exited_pid())
    url, source = api_url_for(None, tmp_path)
    assert url == DEFAULT_API_URL and "has exited" in source and "http://127.0.0.1:8123" in source
    record = json.loads(service_record_path(tmp_path).read_text()) | {"host": "another-machine", "pid": os.getpid()}
    service_record_path(tmp_path).write_text(json.dumps(record))
    url, source = api_url_for(None, tmp_path)
    assert url == DEFAULT_API_URL and "another-machine" in source
    service_record_path(tmp_path).write_text("{not json")
    assert read_service_record(tmp_path) is None and api_url_for(None, tmp_path)[0] == DEFAULT_API_URL


def test_only_the_service_that_wrote_the_record_removes_it(tmp_path):
    write_service_record(tmp_path, "http://127.0.0.1:8123", pid=12345678)
    remove_service_record(tmp_path)  # this process is not 12345678: a newer service's record stays
    assert read_service_record(tmp_path)["pid"] == 12345678
    remove_service_record(tmp_path, pid=12345678)
    assert not service_record_path(tmp_path).exists()


def test_wildcard_addresses_are_reached_on_loopback():
    assert url_for_listener("0.0.0.0", 8000) == "http://127.0.0.1:8000"
    assert url_for_listener("::", 9000) == "http://[::1]:9000"
    assert url_for_listener("10.1.2.3", 80) == "http://10.1.2.3:80"


def test_the_cannot_reach_message_names_the_stale_record(tmp_path, monkeypatch):
    port = free_port()  # nothing listens there
    monkeypatch.setattr(settings_module, "DEFAULT_API_URL", f"http://127.0.0.1:{port}")
    write_service_record(tmp_path, "http://127.0.0.1:8123", pid=exited_pid())
    client = AeforgeClient.from_settings(ServiceSettings.load({"AEFORGE_HOME": str(tmp_path)}))
    with pytest.raises(ApiError) as caught:
        client.health()
    message = str(caught.value)
    assert f"127.0.0.1:{port}" in message and "has exited" in message and "AEFORGE_API_URL" in message


# --- aeforge serve, for real -------------------------------------------------------------------------------


@pytest.fixture
def home(tmp_path, monkeypatch):
    """An AEFORGE_HOME for a service and the in-process CLI, with no AEFORGE_* from outside."""
    for name in [n for n in os.environ if n.startswith("AEFORGE_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AEFORGE_HOME", str(tmp_path))
    return tmp_path


def start_serve(home: Path, log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AEFORGE_")} | {
        "AEFORGE_HOME": str(home),
        "RAY_ADDRESS": "http://127.0.0.1:9",  # API only: no Ray is started, and nothing here talks to one
        "PYTHONPATH": str(REPO),
    }
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "services.cli", "serve", "--port", "0", "--no-dispatch"],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


@pytest.mark.timeout(180)
def test_serve_on_any_port_and_the_cli_finds_it_without_aeforge_api_url(home, monkeypatch):
    from services.cli import app

    log = home / "serve.log"
    proc = start_serve(home, log)
    try:
        record = wait_for(lambda: read_service_record(home), 90, "service.json", detail=log.read_text)
        assert record["pid"] == proc.pid and record["url"].startswith("http://127.0.0.1:")
        assert not record["url"].endswith(":0")  # the port the system chose, not the 0 asked for
        wait_for(lambda: healthy(record["url"]), 60, "the service to answer", detail=log.read_text)
        # The CLI, with neither AEFORGE_API_URL nor a token in its environment: the record and client-token.
        listed = CliRunner().invoke(app, ["jobs", "--output", "json"])
        assert listed.exit_code == 0, listed.output
        assert json.loads(listed.output)["total"] == 0
        assert "aeforge service on " + record["url"] in log.read_text()
        # An explicit AEFORGE_API_URL wins over the record.
        monkeypatch.setenv("AEFORGE_API_URL", f"http://127.0.0.1:{free_port()}")
        refused = CliRunner().invoke(app, ["jobs"])
        assert refused.exit_code == 2 and "the address is from AEFORGE_API_URL" in refused.output
        monkeypatch.delenv("AEFORGE_API_URL")
    finally:
        stop(proc)
    # uvicorn stops cleanly, then raises the SIGTERM again (as a process stopped by it reports)
    assert proc.returncode in (0, -signal.SIGTERM) and "Application shutdown complete" in log.read_text()
    assert not service_record_path(home).exists()  # a clean stop removes it

    # A service killed outright leaves its record behind: the CLI passes it over and says so.
    proc = start_serve(home, log)
    try:
        record = wait_for(lambda: read_service_record(home), 90, "service.json", detail=log.read_text)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    assert read_service_record(home)["pid"] == proc.pid
    monkeypatch.setattr(settings_module, "DEFAULT_API_URL", f"http://127.0.0.1:{free_port()}")
    stale = CliRunner().invoke(app, ["jobs"])
    assert stale.exit_code == 2 and "has exited" in stale.output and record["url"] in stale.output


def test_serve_on_a_port_in_use_is_a_one_line_error(home):
    from services.cli import app

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(
            app, ["serve", "--port", str(port), "--no-dispatch"], env={"RAY_ADDRESS": "http://127.0.0.1:9"}
        )
    assert result.exit_code == 2, result.output
    assert f"cannot listen on 127.0.0.1:{port}" in result.output and "Traceback" not in result.output
    assert not service_record_path(home).exists()


def test_the_services_connections_have_nagles_algorithm_off():
    """The socket `aeforge serve` listens on says TCP, so asyncio turns Nagle's algorithm off on each connection it
    accepts (TCP_NODELAY): with it on, a response's head and body, written apart, waited for the client's delayed
    ACK, and every answer of the single-process service took 40-50 ms."""
    import asyncio

    from services.api import listen

    async def accepted_nodelay() -> int:
        sock = listen("127.0.0.1", 0)
        seen: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        def connected(reader, writer):
            accepted = writer.get_extra_info("socket")
            seen.set_result(accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(connected, sock=sock)
        async with server:
            _, writer = await asyncio.open_connection(*sock.getsockname())
            value = await asyncio.wait_for(seen, 10)
            writer.close()
        return value

    assert asyncio.run(accepted_nodelay()) != 0
