"""The Temporal dev server: loopback only, stopped by PID, gone with its parent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import alive, wait_for
from workerqueue_operator.devcluster.temporal import TemporalError, TemporalServer


def listening(pid: int) -> list[str]:
    """The local addresses (hex, as /proc shows them) of the TCP sockets `pid` listens on."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except FileNotFoundError:  # closed since the listing: the server's own connections come and go
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                found.append(fields[1].split(":")[0])
    return found


def test_every_port_is_on_loopback(temporal: TemporalServer):
    assert temporal.pid is not None
    addresses = listening(temporal.pid)
    assert len(addresses) >= 3  # gRPC, HTTP, metrics, and the internal services' own
    assert set(addresses) == {"0100007F"}, addresses  # 127.0.0.1, nothing on a wildcard or IPv6 address


def test_the_server_dies_with_its_parent(tmp_path: Path):
    script = (f"from pathlib import Path\nfrom workerqueue_operator.devcluster.temporal import TemporalServer\n"
              f"t = TemporalServer(Path({str(tmp_path)!r}))\nt.start()\nprint(t.pid, flush=True)\n"
              "import time\ntime.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, start_new_session=True)
    pid: int | None = None
    gone = False
    try:
        try:
            assert parent.stdout is not None
            pid = int(parent.stdout.readline())
            assert alive(pid)
        finally:
            os.killpg(parent.pid, signal.SIGKILL)
            parent.wait()
            parent.stdout.close()  # type: ignore[union-attr]
        assert pid is not None
        server = pid
        wait_for(lambda: not alive(server), timeout=30, what="temporal gone with its parent")
        gone = True
    finally:
        if not gone and pid is not None and alive(pid):  # the test failed: no server left behind
            os.killpg(pid, signal.SIGKILL)  # its own process group (start_new_session)


def fake_cli(tmp_path: Path, body: str) -> Path:
    cli = tmp_path / "temporal"
    cli.write_text(f"#!/bin/sh\n{body}\n")
    cli.chmod(0o755)
    return cli


def test_a_server_that_exits_is_reported_with_its_log(tmp_path: Path):
    server = TemporalServer(tmp_path / "s", cli=fake_cli(tmp_path, "echo 'unable to open the database'; exit 3"))
    with pytest.raises(TemporalError, match=r"(?s)exited with code 3.*unable to open the database"):
        server.start()
    assert server.pid is None


def test_a_server_that_never_serves_times_out_and_is_stopped(tmp_path: Path):
    server = TemporalServer(tmp_path / "s", start_timeout=1.0, cli=fake_cli(tmp_path, "echo starting; exec sleep 60"))
    with pytest.raises(TemporalError, match=r"(?s)timed out after 1s.*starting"):
        server.start()
    assert server.pid is None and not (tmp_path / "s" / "pid").exists()
