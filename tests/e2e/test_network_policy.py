"""Network policy, port ranges, the PORTS column and DNS after a rename, end to end: the real
`cocon daemon` and the `cocon`/`docker` CLIs, busybox containers on real bridges, veths and nftables.

Traffic stays on this machine (container to container over the test's bridges, host to 127.0.0.1).
One daemon for the module (restarted once, on the same state, to show that the rules come back);
at the end every container and network is removed through the CLI, the daemon stopped, and
`ip -j link` / `nft -j list ruleset` must be as before (other live runs' objects left out)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "integration"))

from test_network_real import OTHER_RUNS_LINKS, _links, _ruleset, free_subnet

from cli_helpers import COCON
from cocon.engine.netattach import names_for
from daemon_helpers import DOCKER, Daemon, cleanup, start_daemon

# busybox web servers: one per port, each answering "<text>-<port>"
HTTPD = "for p in {ports}; do mkdir -p /w$p && echo {text}-$p > /w$p/index.html && httpd -p $p -h /w$p; done; exec sleep 3600"


class Env:
    def __init__(self, d: Daemon, base: str) -> None:
        self.d = d
        self.base = base
        self.networks: list[str] = []

    def cocon(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([COCON, *args], env=self.d.env, capture_output=True, text=True, timeout=60)
        if check and proc.returncode != 0:
            raise AssertionError(
                f"cocon {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
            )
        return proc

    def docker(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = dict(self.d.env, DOCKER_CONFIG=os.path.join(self.d.run, "docker-config"))
        proc = subprocess.run([DOCKER, *args], env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return proc

    def network(self, name: str, *args: str) -> dict[str, Any]:
        self.cocon("network", "create", "--subnet", free_subnet(), *args, name)
        self.networks.append(name)
        return self.inspect_network(name)

    def inspect_network(self, name: str) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.cocon("network", "inspect", name).stdout)[0]
        return doc

    def ip(self, container: str, network: str) -> str:
        doc = json.loads(self.cocon("inspect", container).stdout)[0]
        return str(doc["NetworkSettings"]["Networks"][network]["IPAddress"])

    def reach(self, network: str, *targets: str) -> dict[str, str]:
        """From a one-off container on `network`: what each `HOST:PORT` answers over HTTP ('blocked'
        when nothing does within 1 s), and 'ping' for a ping to the first target's host."""
        script = "".join(
            f"echo {t}=$(timeout 1 wget -qO- http://{t}/ 2>/dev/null || echo blocked); " for t in targets
        )
        host = targets[0].split(":")[0]
        script += f"ping -c1 -W1 {host} >/dev/null 2>&1 && echo ping=ok || echo ping=blocked"
        out = self.cocon("run", "--rm", "--network", network, "busybox", "sh", "-c", script).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def restart_daemon(self, meanwhile: Any = None) -> None:
        """Stop the daemon (cleanly), run `meanwhile()`, start a new one on the same state."""
        assert self.d.stop() == 0 and "Traceback" not in self.d.log(), self.d.log()
        if meanwhile is not None:
            meanwhile()
        self.d = start_daemon(self.base, root=self.d.root, run=self.d.run)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    links_before, rules_before = _links(), _ruleset()
    base = str(tmp_path_factory.mktemp("network-policy"))
    e = Env(start_daemon(base), base)
    table, bridge = names_for(e.d.run)
    try:
        yield e
        mine = [bridge] + ["cn-" + e.inspect_network(n)["Id"][:12] for n in e.networks]
        ids = e.cocon("ps", "-aq").stdout.split()
        if ids:
            e.cocon("rm", "-f", *ids)
        for n in e.networks:
            e.cocon("network", "rm", n)
        assert e.d.stop() == 0 and "Traceback" not in e.d.log(), e.d.log()
        cleanup(e.d)  # the default bridge (kept by the daemon as docker0) and the table go
        links_after, rules_after = _links(), _ruleset()
        new = {n for n in links_after if n not in links_before}
        assert not {n for n in new if n in mine or not n.startswith(OTHER_RUNS_LINKS)}, new
        assert not [n for n in mine if n in links_after], mine
        diff = set(rules_before) ^ set(rules_after)
        assert not [r for r in diff if f'"{table}"' in r], diff
        assert not [r for r in diff if '"cocon' not in r], diff
    finally:
        e.d.stop()
        cleanup(e.d)


def _nft_chain(table: str, chain: str) -> str:
    return subprocess.run(
        ["nft", "list", "chain", "inet", table, chain], capture_output=True, text=True, check=True
    ).stdout


def _free_ports(n: int) -> int:
    """The first of `n` consecutive TCP ports that are free on every address."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("0.0.0.0", 0))
            first = s.getsockname()[1]
        if first + n >= 65536:
            continue
        socks = []
        try:
            for p in range(first, first + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("0.0.0.0", p))
            return int(first)
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise AssertionError("no free port range")


def _http(url: str, timeout: float = 10) -> str:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                return str(resp.read().decode().strip())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_policy_opens_one_port_between_networks_and_survives_a_restart(env: Env) -> None:
    back = env.network("pol-back")
    env.network("pol-front")
    env.network("pol-other")
    env.cocon("run", "-d", "--name", "pol-srv", "--network", "pol-back", "busybox", "sh", "-c",
              HTTPD.format(ports="8080 9090", text="back"))  # fmt: skip
    ip = env.ip("pol-srv", "pol-back")
    a, b = f"{ip}:8080", f"{ip}:9090"
    # within the network everything; from another network nothing
    assert env.reach("pol-back", a, b) == {a: "back-8080", b: "back-9090", "ping": "ok"}
    assert env.reach("pol-front", a, b) == {a: "blocked", b: "blocked", "ping": "blocked"}

    rule = env.cocon("network", "policy", "add", "pol-back", "--from", "pol-front", "--port", "8080/tcp",
                     "--description", "web tier").stdout.strip()  # fmt: skip
    assert len(rule) == 12 and all(c in "0123456789abcdef" for c in rule)
    assert env.reach("pol-front", a, b) == {a: "back-8080", b: "blocked", "ping": "blocked"}
    assert env.reach("pol-other", a, b) == {a: "blocked", b: "blocked", "ping": "blocked"}  # only pol-front

    listed = [json.loads(line) for line in env.cocon("network", "policy", "ls", "pol-back", "--format", "json")
              .stdout.splitlines()]  # fmt: skip
    assert [(r["Id"], r["From"], r["Ports"], r["Origin"], r["Active"], r["Description"]) for r in listed] == [
        (rule, "pol-front", "8080/tcp", "user", True, "web tier")
    ]
    table = env.cocon("network", "policy", "ls").stdout  # every network's rules
    assert table.split("\n")[0].split() == ["RULE", "ID", "NETWORK", "FROM", "PORTS", "ORIGIN", "STATUS",
                                            "DESCRIPTION"]  # fmt: skip
    assert [rule, "pol-back", "pol-front", "8080/tcp", "user", "active", "web", "tier"] in [
        line.split() for line in table.splitlines()
    ]
    # inspect: the chains and the rules; the chain in nftables carries the rule
    fw = env.inspect_network("pol-back")["Firewall"]
    table_name = names_for(env.d.run)[0]
    assert fw["Table"] == f"inet {table_name}"
    assert fw["Chains"] == {"Inbound": f"in-cn-{back['Id'][:12]}", "Outbound": f"out-cn-{back['Id'][:12]}"}
    assert [r["Id"] for r in fw["Rules"]] == [rule]
    chain = _nft_chain(table_name, fw["Chains"]["Inbound"])
    assert f'tcp dport 8080 accept comment "policy {rule} allow pol-front -> pol-back"' in chain

    # a daemon restart (its table deleted meanwhile): rebuilt from the database, the rule still there
    env.restart_daemon(lambda: subprocess.run(["nft", "delete", "table", "inet", table_name], check=True))
    assert f"policy {rule}" in _nft_chain(table_name, fw["Chains"]["Inbound"])
    assert env.reach("pol-front", a, b) == {a: "back-8080", b: "blocked", "ping": "blocked"}

    # a rule for everything (ping too), then both removed (by a unique prefix): blocked again
    every = env.cocon("network", "policy", "add", "pol-back", "--from", "pol-front").stdout.strip()
    assert env.reach("pol-front", a, b) == {a: "back-8080", b: "back-9090", "ping": "ok"}
    assert env.cocon("network", "policy", "rm", "pol-back", rule[:6], every).stdout.split() == [rule, every]
    assert env.reach("pol-front", a, b) == {a: "blocked", b: "blocked", "ping": "blocked"}
    assert env.cocon("network", "policy", "ls", "-q", "pol-back").stdout == ""
    assert "policy" not in _nft_chain(table_name, fw["Chains"]["Inbound"])


def test_policy_from_labels_and_port_ranges_of_rules(env: Env) -> None:
    net = env.network("pol-lab", "--label", "cocon.policy.allow-from=pol-front:9090-9091,pol-later")
    env.cocon("run", "-d", "--name", "pol-lsrv", "--network", "pol-lab", "busybox", "sh", "-c",
              HTTPD.format(ports="8080 9091", text="lab"))  # fmt: skip
    ip = env.ip("pol-lsrv", "pol-lab")
    a, b = f"{ip}:8080", f"{ip}:9091"
    assert env.reach("pol-front", a, b) == {a: "blocked", b: "lab-9091", "ping": "blocked"}
    rules = net["Firewall"]["Rules"]
    assert [(r["From"], r["Ports"], r["Origin"], r["Active"]) for r in rules] == [
        ("pol-front", "9090-9091/tcp", "label", True),
        ("pol-later", "all", "label", False),  # waits for a network of that name
    ]
    assert "waiting for network pol-later" in env.cocon("network", "policy", "ls", "pol-lab").stdout
    env.network("pol-later")
    assert env.reach("pol-later", a, b) == {a: "lab-8080", b: "lab-9091", "ping": "ok"}
    # a bad label: refused, nothing made
    p = env.cocon("network", "create", "--label", "cocon.policy.allow-from=pol-front:99999", "pol-bad",
                  check=False)  # fmt: skip
    assert p.returncode != 0 and "invalid port '99999'" in p.stderr, p.stderr
    assert "pol-bad" not in env.cocon("network", "ls").stdout


def test_policy_mistakes_are_clear(env: Env) -> None:
    env.network("pol-err")
    cases = [
        (["add", "pol-err", "--from", "nosuchnet"], "network nosuchnet not found"),
        (["add", "pol-err", "--from", "pol-err"], "always reach each other"),
        (["add", "pol-err", "--from", "pol-front", "--port", "80/sctp"], "invalid port '80/sctp'"),
        (["add", "pol-err", "--from", "pol-front", "--port", "90-80"], "invalid port '90-80'"),
        (["add", "pol-err", "--from", "10.1.2.3/33"], "is not a subnet"),
        (["add", "bridge", "--from", "pol-front"], "default bridge network takes no policies"),
        (["add", "nosuchnet", "--from", "pol-front"], "network nosuchnet not found"),
        (["rm", "pol-err", "abcdef"], "rule 'abcdef' of network pol-err not found"),
        (["ls", "host"], "host has no firewall"),
    ]
    for args, words in cases:
        p = env.cocon("network", "policy", *args, check=False)
        assert p.returncode != 0 and words in p.stderr, (args, p.stderr)
    rule = env.cocon(
        "network", "policy", "add", "pol-err", "--from", "10.99.0.0/16", "-p", "udp"
    ).stdout.strip()
    p = env.cocon("network", "policy", "add", "pol-err", "--from", "10.99.0.0/16", "-p", "udp", check=False)
    assert p.returncode != 0 and f"already has this rule ({rule})" in p.stderr
    listed = json.loads(env.cocon("network", "policy", "ls", "--format", "json", "pol-err").stdout)
    assert (listed["From"], listed["Ports"], listed["Protocol"]) == ("10.99.0.0/16", "udp", "udp")
    helptext = env.cocon("network", "policy", "add", "--help").stdout
    assert "--from SOURCE" in helptext and "PORT[-END][/PROTO]" in helptext
    assert "cocon.policy.allow-from" in env.cocon("network", "policy", "--help").stdout
    # the native API beside the CLI
    r = env.d.request("GET", "/cocon/v1/networks/pol-err/policy")
    assert r.status == 200 and [x["Id"] for x in r.json()] == [rule]
    r = env.d.request(
        "POST", "/cocon/v1/networks/pol-err/policy", json.dumps({"From": "pol-front", "Colour": 1})
    )
    assert r.status == 400 and "unknown field 'Colour'" in r.message
    assert env.d.request("DELETE", f"/cocon/v1/networks/pol-err/policy/{rule}").json()["Id"] == rule


def test_port_ranges_reach_the_right_ports_and_ps_shows_them(env: Env) -> None:
    first = _free_ports(2)
    env.cocon("run", "-d", "--name", "pol-range", "-p", f"127.0.0.1:{first}-{first + 1}:8080-8081",
              "busybox", "sh", "-c", HTTPD.format(ports="8080 8081", text="range"))  # fmt: skip
    assert _http(f"http://127.0.0.1:{first}/") == "range-8080"
    assert _http(f"http://127.0.0.1:{first + 1}/") == "range-8081"
    ports = f"127.0.0.1:{first}->8080/tcp, 127.0.0.1:{first + 1}->8081/tcp"
    row = [line for line in env.cocon("ps").stdout.splitlines() if "pol-range" in line]
    assert len(row) == 1 and ports in row[0], row
    assert json.loads(env.cocon("ps", "--format", "json", "-f", "name=pol-range").stdout)["Ports"] == ports
    assert env.docker("ps", "--filter", "name=pol-range", "--format", "{{.Ports}}").stdout.strip() == ports
    # one container port on a host range: the first free port of it
    lo = _free_ports(3)
    blocker = socket.socket()
    blocker.bind(("0.0.0.0", lo))
    blocker.listen(1)
    try:
        env.cocon("run", "-d", "--name", "pol-anyof", "-p", f"{lo}-{lo + 2}:8080", "busybox", "sh", "-c",
                  HTTPD.format(ports="8080", text="anyof"))  # fmt: skip
    finally:
        blocker.close()
    assert env.cocon("port", "pol-anyof").stdout.strip() == f"8080/tcp -> 0.0.0.0:{lo + 1}"
    assert _http(f"http://127.0.0.1:{lo + 1}/") == "anyof-8080"
    # the ranges' lengths differ; [::1]
    p = env.cocon("run", "-d", "-p", "8000-8002:80-81", "busybox", "true", check=False)
    assert p.returncode != 0 and "has 3 ports and the container range 80-81 2" in p.stderr, p.stderr
    p = env.cocon("run", "-d", "-p", f"[::1]:{first}:80", "busybox", "true", check=False)
    assert p.returncode != 0 and "cannot publish 80/tcp on [::1]" in p.stderr, p.stderr


def test_a_renamed_container_answers_to_its_new_name_only(env: Env) -> None:
    env.network("pol-dns")
    env.cocon("run", "-d", "--name", "dns-old", "--network", "pol-dns", "--network-alias", "dns-alias",
              "busybox", "sleep", "3600")  # fmt: skip
    ip = env.ip("dns-old", "pol-dns")
    script = (
        "for n in dns-old dns-new dns-alias; do nslookup $n >/dev/null 2>&1 && echo $n=ok || echo $n=no; done"
    )
    out = env.cocon("run", "--rm", "--network", "pol-dns", "busybox", "sh", "-c", script).stdout
    assert out.split() == ["dns-old=ok", "dns-new=no", "dns-alias=ok"], out
    env.cocon("rename", "dns-old", "dns-new")
    out = env.cocon("run", "--rm", "--network", "pol-dns", "busybox", "sh", "-c",
                    script + "; nslookup dns-new | grep Address").stdout  # fmt: skip
    assert out.split()[:3] == ["dns-old=no", "dns-new=ok", "dns-alias=ok"] and ip in out, out


def _host_ipv6() -> str | None:
    """A global IPv6 address of this host (traffic to it is local), if it has one."""
    out = subprocess.run(
        ["ip", "-j", "-6", "addr", "show", "scope", "global"], capture_output=True, text=True
    )
    for link in json.loads(out.stdout or "[]"):
        for a in link.get("addr_info", []):
            if not a.get("tentative"):
                return str(a["local"])
    return None


def test_publishing_on_an_ipv6_host_address(env: Env) -> None:
    host6 = _host_ipv6()
    port = _free_ports(1)
    v6 = f"fd{os.urandom(1).hex()}:{os.urandom(2).hex()}:{os.urandom(2).hex()}::/64"
    env.network("pol-six", "--ipv6", "--subnet", v6)
    if host6 is None:  # the error, at least, is clear
        p = env.cocon("run", "-d", "-p", f"[fd00::99]:{port}:80", "busybox", "true", check=False)
        assert p.returncode != 0 and "not an address of this host" in p.stderr, p.stderr
        return
    env.cocon("run", "-d", "--name", "pol-six", "--network", "pol-six", "-p", f"[{host6}]:{port}:8080",
              "busybox", "sh", "-c", HTTPD.format(ports="8080", text="six"))  # fmt: skip
    assert _http(f"http://[{host6}]:{port}/") == "six-8080"
    assert env.docker("port", "pol-six").stdout.strip() == f"8080/tcp -> [{host6}]:{port}"
    # on a network without IPv6: refused before the container starts, saying what to do
    p = env.cocon("run", "-d", "--network", "pol-front", "-p", f"[{host6}]:{port + 1}:80", "busybox", "true",
                  check=False)  # fmt: skip
    assert p.returncode != 0 and "network pol-front has no IPv6 subnet" in p.stderr, p.stderr
