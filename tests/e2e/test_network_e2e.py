"""Container networking end to end: the real `cocon daemon`, the `cocon` and `docker` CLIs, busybox
containers on real bridges, veths, namespaces and nftables (cocon.engine.netattach over
cocon.network).

Traffic stays on this machine: between containers over the test's bridges, to 127.0.0.1 and to the
host's own address (delivered locally). One daemon for the module; at the end every container and
network is removed through the CLI, the daemon stopped, and `ip -j link` / `nft -j list ruleset`
must be as before (objects of other live runs, recognisable by their prefixes, are left out)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "integration"))

from test_network_real import (
    OTHER_RUNS_LINKS,
    _links,
    _ruleset,
    free_port,
    free_subnet,
    host_address,
    ns_socket,
)

from cli_helpers import COCON, reset_network
from cocon.engine.netattach import names_for
from daemon_helpers import DOCKER, Daemon, cleanup, start_daemon

# a tiny web server: `/www/index.html` holds $1
HTTPD = "mkdir -p /www && echo {text} > /www/index.html && exec httpd -f -p {port} -h /www"


class Env:
    def __init__(self, d: Daemon) -> None:
        self.d = d
        self.networks: list[str] = []

    def cocon(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([COCON, *args], env=self.d.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(
                f"cocon {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
            )
        return proc

    def docker(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        env = dict(self.d.env, DOCKER_CONFIG=os.path.join(self.d.run, "docker-config"))
        proc = subprocess.run([DOCKER, *args], env=env, capture_output=True, text=True, timeout=60)
        if check and proc.returncode != 0:
            raise AssertionError(
                f"docker {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
            )
        return proc

    def network(self, name: str, *args: str) -> dict[str, Any]:
        self.cocon("network", "create", *args, name)
        self.networks.append(name)
        doc: dict[str, Any] = json.loads(self.cocon("network", "inspect", name).stdout)[0]
        return doc

    def inspect(self, container: str) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.cocon("inspect", container).stdout)[0]
        return doc

    def sh(self, network: str, script: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """A one-off busybox container on `network` running `script`."""
        return self.cocon("run", "--rm", "--network", network, "busybox", "sh", "-c", script, check=check)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    links_before, rules_before = _links(), _ruleset()
    d = start_daemon(str(tmp_path_factory.mktemp("network-e2e")))
    table, bridge = names_for(d.run)
    e = Env(d)
    mine: list[str] = [bridge]
    try:
        yield e
        # everything through the CLI: containers, then networks; then the daemon stops and cocon's
        # networking is reset
        for n in e.networks:
            mine.append("cn-" + json.loads(e.cocon("network", "inspect", n).stdout)[0]["Id"][:12])
        ids = e.cocon("ps", "-aq").stdout.split()
        if ids:
            e.cocon("rm", "-f", *ids)
        for n in e.networks:
            e.cocon("network", "rm", n)
        assert d.stop() == 0 and "Traceback" not in d.log(), d.log()
        assert bridge in _links()  # the default network outlives the daemon, as docker0 does
        reset_network(d.root, d.run)  # what a reset of cocon's state removes
        links_after, rules_after = _links(), _ruleset()
        new = {n for n in links_after if n not in links_before}
        assert not {n for n in new if n in mine or not n.startswith(OTHER_RUNS_LINKS)}, new
        assert len(mine) == len(e.networks) + 1 and not [n for n in mine if n in links_after], mine
        diff = set(rules_before) ^ set(rules_after)
        assert not [r for r in diff if f'"{table}"' in r], diff  # cocon's table of this daemon is gone
        assert not [r for r in diff if '"cocon' not in r], diff  # nothing else of the host changed
        assert not os.listdir(os.path.join(d.run, "netns")), "network namespaces left"
    finally:
        d.stop()
        cleanup(d)  # the fallback: resets what is left of this daemon's networking


def _ip(doc: dict[str, Any], network: str) -> str:
    return str(doc["NetworkSettings"]["Networks"][network]["IPAddress"])


def _wait_http(url: str, timeout: float = 10) -> str:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                return str(resp.read().decode().strip())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_user_network_by_ip_name_and_alias(env: Env) -> None:
    net = env.network("e2e-front", "--subnet", free_subnet(), "--label", "team=web")
    assert net["Labels"] == {"team": "web"} and net["IPAM"]["Config"][0]["Gateway"].endswith(".1")
    env.cocon("run", "-d", "--name", "e2e-web", "--network", "e2e-front", "--network-alias", "www",
              "busybox", "sh", "-c", HTTPD.format(text="hello-web", port=8080))  # fmt: skip
    doc = env.inspect("e2e-web")
    ip = _ip(doc, "e2e-front")
    assert doc["NetworkSettings"]["Networks"]["e2e-front"]["Gateway"] == net["IPAM"]["Config"][0]["Gateway"]
    assert doc["NetworkSettings"]["Networks"]["e2e-front"]["MacAddress"].startswith("02:42:")
    listed = json.loads(env.cocon("network", "inspect", "e2e-front").stdout)[0]["Containers"]
    assert [c["IPv4Address"] for c in listed.values()] == [f"{ip}/24"]
    script = (
        f"ping -c1 -W2 {ip} >/dev/null && echo ip-ok; ping -c1 -W2 e2e-web >/dev/null && echo name-ok; "
        "for i in 1 2 3 4 5 6 7 8 9 10; do wget -qO- http://www:8080/ && break; sleep 0.2; done; "
        "cat /etc/resolv.conf; cat /etc/hosts"
    )
    out = env.sh("e2e-front", script).stdout
    assert "ip-ok" in out and "name-ok" in out and "hello-web" in out, out
    assert f"nameserver {net['IPAM']['Config'][0]['Gateway']}" in out, out


def test_another_network_cannot_reach(env: Env) -> None:
    env.network("e2e-other", "--subnet", free_subnet())
    ip = _ip(env.inspect("e2e-web"), "e2e-front")
    out = env.sh("e2e-other", f"timeout 3 wget -qO- http://{ip}:8080/ || echo blocked; nslookup e2e-web || echo no-name",
                 check=False).stdout  # fmt: skip
    assert "blocked" in out and "hello-web" not in out and "no-name" in out, out


def test_internal_network_reaches_nothing_outside(env: Env) -> None:
    env.network("e2e-inside", "--internal", "--subnet", free_subnet())
    host = host_address()
    port = free_port()
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((host, port))
    server.listen(8)
    accepted: list[str] = []

    def serve() -> None:
        while True:
            try:
                conn, peer = server.accept()
            except OSError:
                return
            accepted.append(peer[0])
            conn.sendall(b"from-the-host\n")
            conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        web_ip = _ip(env.inspect("e2e-web"), "e2e-front")
        out = env.sh("e2e-inside", f"nc -w 2 {host} {port} </dev/null || echo host-blocked; "
                     f"timeout 3 wget -qO- http://{web_ip}:8080/ || echo web-blocked", check=False).stdout  # fmt: skip
        assert "host-blocked" in out and "web-blocked" in out and "from-the-host" not in out, out
        assert accepted == []
        # the same from a network that is not internal: the host answers (masqueraded outbound)
        out = env.sh("e2e-front", f"nc -w 2 {host} {port} </dev/null").stdout
        assert "from-the-host" in out and len(accepted) == 1
    finally:
        server.close()


def test_published_tcp_port_from_loopback_and_the_host_address(env: Env) -> None:
    port = free_port()
    env.cocon("run", "-d", "--name", "e2e-pub", "-p", f"{port}:8080", "busybox", "sh", "-c",
              HTTPD.format(text="published", port=8080))  # fmt: skip
    assert _wait_http(f"http://127.0.0.1:{port}/") == "published"
    assert _wait_http(f"http://{host_address()}:{port}/") == "published"
    assert env.cocon("port", "e2e-pub").stdout.strip() == f"8080/tcp -> 0.0.0.0:{port}"
    row = json.loads(env.cocon("inspect", "e2e-pub").stdout)[0]["NetworkSettings"]
    assert row["Ports"] == {"8080/tcp": [{"HostIp": "0.0.0.0", "HostPort": str(port)}]}
    assert row["Networks"]["bridge"]["IPAddress"]  # the default bridge network


def test_published_udp_port(env: Env) -> None:
    port = free_port(socket.SOCK_DGRAM)
    env.cocon("run", "-d", "--name", "e2e-udp", "-p", f"127.0.0.1:{port}:5353/udp", "busybox", "sleep", "60")
    pid = env.inspect("e2e-udp")["State"]["Pid"]
    # the UDP service: a socket in the container's network namespace (busybox has no UDP server)
    server = ns_socket(f"/proc/{pid}/ns/net", socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("0.0.0.0", 5353))
    server.settimeout(5)
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.settimeout(5)
    try:
        client.sendto(b"ping-udp", ("127.0.0.1", port))
        data, peer = server.recvfrom(100)
        assert data == b"ping-udp"
        server.sendto(b"pong-udp", peer)
        assert client.recvfrom(100)[0] == b"pong-udp"
    finally:
        client.close()
        server.close()
    assert env.cocon("port", "e2e-udp").stdout.strip() == f"5353/udp -> 127.0.0.1:{port}"


def test_a_port_already_taken_fails_before_the_container_starts(env: Env) -> None:
    taken = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    taken.bind(("0.0.0.0", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    try:
        p = env.cocon(
            "run", "-d", "--name", "e2e-taken", "-p", f"{port}:80", "busybox", "sleep", "60", check=False
        )
        assert p.returncode != 0 and f"port {port}/tcp" in p.stderr and "already in use" in p.stderr, p.stderr
        state = env.inspect("e2e-taken")["State"]
        assert not state["Running"] and state["StartedAt"].startswith("0001")
    finally:
        taken.close()
    env.cocon("rm", "-f", "e2e-taken")


def test_docker_cli_network_connect_and_publish(env: Env) -> None:
    env.docker("network", "create", "--subnet", free_subnet(), "e2e-docker")
    env.networks.append("e2e-docker")
    port = free_port()
    env.docker("run", "-d", "--name", "e2e-dk", "--network", "e2e-docker", "-p", f"127.0.0.1:{port}:8080",
               "busybox", "sh", "-c", HTTPD.format(text="via-docker", port=8080))  # fmt: skip
    assert _wait_http(f"http://127.0.0.1:{port}/") == "via-docker"
    assert env.docker("port", "e2e-dk").stdout.strip() == f"8080/tcp -> 127.0.0.1:{port}"
    # connected live to a second network: reachable there by name at once
    env.docker("network", "connect", "--alias", "dk2", "e2e-front", "e2e-dk")
    out = env.sh("e2e-front", "timeout 3 wget -qO- http://dk2:8080/").stdout
    assert "via-docker" in out
    doc = json.loads(env.docker("inspect", "e2e-dk").stdout)[0]
    assert set(doc["NetworkSettings"]["Networks"]) == {"e2e-docker", "e2e-front"}
    env.docker("network", "disconnect", "e2e-front", "e2e-dk")
    assert (
        "bad address" in env.sh("e2e-front", "timeout 3 wget -qO- http://dk2:8080/", check=False).stderr
    )  # (busybox wget -T crashes)
    # -P: the exposed port on a free host port
    env.docker("run", "-d", "--name", "e2e-all", "-P", "--expose", "8080", "busybox", "sh", "-c",
               HTTPD.format(text="published-all", port=8080))  # fmt: skip
    mapping = env.docker("port", "e2e-all", "8080").stdout.split()[0]
    assert _wait_http(f"http://127.0.0.1:{mapping.rsplit(':', 1)[1]}/") == "published-all"
    busy = env.docker("network", "rm", "e2e-docker", check=False)
    assert busy.returncode != 0
