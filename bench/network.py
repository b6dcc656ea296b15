#!/usr/bin/env python3
"""Network throughput and request latency between two containers on one cocon network, and through a
published port, side by side with the same pair of processes in the host's network namespace.

The measuring processes are the host's own (iperf3, and a small Python TCP request/response loop),
run inside the containers' network namespaces with `nsenter --net=$COCON_RUN/netns/<id>`: the path
measured is exactly the containers' (veth, bridge, nftables), the programs are identical on both
sides. Pairs, each measured in one run:

- host: server and client in the host's namespace on 127.0.0.1 (the reference);
- container → container on one user network (by the server's address on the bridge);
- host → published port (127.0.0.1:PORT, DNAT to the container's server);

the two container pairs once per network MTU: Docker's default 1500 and 65520 (`network create -o
mtu=65520`; loopback's is 65536), or the list in BENCH_MTUS (e.g. `BENCH_MTUS=1500,9000,65520`).
The MTU is what separates the container pair from loopback (docs/network.md, "MTU").

Prints throughput (iperf3, TCP, 3 s, median of 3 rounds in which the pairs take turns, so that the
load of a shared machine hits them alike) and the median round trip of 2000 one-byte requests,
and the ratios to the host pair of the same rounds (target: >= 0.9 of host throughput between containers).

Run as root:  .venv/bin/python bench/network.py
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

BIN = os.path.dirname(sys.executable)
COCON = os.path.join(BIN, "cocon")
JUMBO = 65520  # the largest MTU a veth takes is 65535; 65520 is what loopback-like setups use

ECHO_SERVER = r"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(1); print("ready", flush=True)
c, _ = s.accept(); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
while (b := c.recv(1)):
    c.sendall(b)
"""

ECHO_CLIENT = r"""
import socket, sys, time, statistics
c = socket.create_connection((sys.argv[1], int(sys.argv[2])))
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
rtts = []
for _ in range(2000):
    t = time.perf_counter(); c.sendall(b"x"); c.recv(1); rtts.append(time.perf_counter() - t)
print(statistics.median(rtts) * 1e6)
"""


def sh(cmd: list[str], env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr}")
    return proc.stdout


def in_ns(netns: str | None, cmd: list[str]) -> list[str]:
    return ["nsenter", f"--net={netns}", *cmd] if netns else cmd


def iperf(server_ns: str | None, client_ns: str | None, target: str, port: int, server_port: int) -> float:
    """Gbit/s from client to server (one run of 3 s)."""
    server = subprocess.Popen(in_ns(server_ns, ["iperf3", "-s", "-1", "-p", str(server_port)]),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        time.sleep(0.3)
        out = sh(in_ns(client_ns, ["iperf3", "-c", target, "-p", str(port), "-t", "3", "-J"]))
        return float(json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e9)
    finally:
        server.wait(timeout=30)


def rtt(server_ns: str | None, client_ns: str | None, target: str, port: int, server_port: int) -> float:
    """Median round trip in microseconds of one-byte requests."""
    server = subprocess.Popen(in_ns(server_ns, [sys.executable, "-c", ECHO_SERVER, str(server_port)]),
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        return float(sh(in_ns(client_ns, [sys.executable, "-c", ECHO_CLIENT, target, str(port)])))
    finally:
        server.kill()
        server.wait()


Pair = tuple[str, "str | None", "str | None", str, int]  # label, server netns, client netns, target, shift


def measure(pairs: list[Pair], rounds: int = 3) -> list[tuple[str, float, float]]:
    """(label, Gbit/s, RTT us) of each pair: medians of `rounds` rounds in which every pair runs once
    in turn, so that a change of the machine's load (other work on its cores) hits all pairs alike."""
    gbps: list[list[float]] = [[] for _ in pairs]
    rtts: list[list[float]] = [[] for _ in pairs]
    for _ in range(rounds):
        for i, (_label, s_ns, c_ns, target, shift) in enumerate(pairs):
            gbps[i].append(iperf(s_ns, c_ns, target, 5201 + shift, 5201))
            rtts[i].append(rtt(s_ns, c_ns, target, 5300 + shift, 5300))
    return [
        (p[0], statistics.median(g), statistics.median(r)) for p, g, r in zip(pairs, gbps, rtts, strict=True)
    ]


def main() -> int:
    if not shutil.which("iperf3") or not shutil.which("nsenter"):
        raise SystemExit("iperf3 and nsenter are needed: run `make setup`")
    base = tempfile.mkdtemp(prefix="cocon-bench-net-")
    run = tempfile.mkdtemp(prefix="cocon-bench-net-", dir="/run")
    env = dict(os.environ, COCON_ROOT=os.path.join(base, "root"), COCON_RUN=run)
    try:
        sh([COCON, "image", "bootstrap", "busybox"], env)
        mtus = [int(m) for m in os.environ.get("BENCH_MTUS", f"1500,{JUMBO}").split(",")]
        print(f"{'pair':<38} {'Gbit/s':>8} {'ratio':>6} {'RTT us':>8} {'ratio':>6}")
        summary = []
        for n, mtu in enumerate(mtus):
            net = f"bench{n}"
            sh(
                [COCON, "network", "create", "--subnet", f"10.233.{41 + n}.0/24", "--opt", f"mtu={mtu}", net],
                env,
            )
            ids = {}
            for name, extra in (
                ("srv", ["-p", f"127.0.0.1:{15201 + n}:5201", "-p", f"127.0.0.1:{15300 + n}:5300"]),
                ("cli", []),
            ):
                ids[name] = sh([COCON, "run", "-d", "--name", f"{name}{n}", "--network", net, *extra,
                                "busybox", "sleep", "3600"], env).strip()  # fmt: skip
            doc = json.loads(sh([COCON, "inspect", f"srv{n}"], env))[0]
            srv_ip = doc["NetworkSettings"]["Networks"][net]["IPAddress"]
            ns = {name: os.path.join(run, "netns", cid) for name, cid in ids.items()}
            rows = measure(
                [
                    ("host (127.0.0.1)", None, None, "127.0.0.1", 0),
                    (f"container -> container (MTU {mtu})", ns["srv"], ns["cli"], srv_ip, 0),
                    # 15201+n/15300+n → 5201/5300 in the server container
                    (f"host -> published port (MTU {mtu})", ns["srv"], None, "127.0.0.1", 10000 + n),
                ]
            )
            sh([COCON, "rm", "-f", f"srv{n}", f"cli{n}"], env)
            host_gbps, host_rtt = rows[0][1], rows[0][2]
            for label, gbps, us in rows:
                print(f"{label:<38} {gbps:8.2f} {gbps / host_gbps:6.2f} {us:8.1f} {host_rtt / us:6.2f}")
            summary.append(
                f"throughput container -> container (MTU {mtu}) / host: {rows[1][1] / host_gbps:.2f}"
            )
        for line in summary:
            print(line + "  (target >= 0.9)")
    finally:
        subprocess.run([COCON, "system", "reset", "-f"], env=env, capture_output=True, check=False)
        pid_file = os.path.join(run, "cocon.pid")
        if os.path.exists(pid_file):
            with open(pid_file) as f:
                subprocess.run(["kill", f.read().split()[0]], check=False)
            time.sleep(1)
        subprocess.run(["umount", "-R", "-l", run], capture_output=True, check=False)
        shutil.rmtree(run, ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
