#!/usr/bin/env python3
"""Container network figures: TCP throughput and round-trip latency,
host <-> container and container <-> container, for Vessel and, where
Debian's docker.io is installed, dockerd + runc side by side in one run.

The tools are busybox's (Debian's busybox-static, the test image): `nc` as
sink and echo server, `dd` as source, `ping` for container-to-container
round trips. The host side is this script.

dockerd runs on its own socket, data root and bridge (made here, with
iptables left alone), so it touches nothing else on the host.

Usage: scripts/bench-net.py [--rounds 3] [--mib 256] [--no-dockerd]
"""

import argparse
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(HERE, "scripts"))
from benchlib import Engine  # noqa: E402


def ip_of(e, name):
    out = e.docker("inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", name).stdout
    return out.strip().split()[0]


def wait_port(e, name, port):
    e.docker("exec", name, "sh", "-c",
             f"for i in $(seq 200); do netstat -ltn | grep -q ':{port} ' && exit 0; sleep 0.05; done; exit 1")


def host_throughput(ip, mib):
    data = b"\0" * (1 << 20)
    s = socket.create_connection((ip, 5001), timeout=30)
    t0 = time.monotonic()
    for _ in range(mib):
        s.sendall(data)
    s.shutdown(socket.SHUT_WR)
    while s.recv(65536):
        pass
    dt = time.monotonic() - t0
    s.close()
    return mib / dt


def host_rtt(ip, n=500):
    s = socket.create_connection((ip, 5002), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    times = []
    for _ in range(n):
        t0 = time.monotonic()
        s.sendall(b"x")
        if not s.recv(1):
            break
        times.append(time.monotonic() - t0)
    s.close()
    return statistics.median(times) * 1e6


def c2c_throughput(e, client, ip, mib):
    t0 = time.monotonic()
    e.docker("exec", client, "true")
    overhead = time.monotonic() - t0
    t0 = time.monotonic()
    e.docker("exec", client, "sh", "-c", f"dd if=/dev/zero bs=1048576 count={mib} 2>/dev/null | nc {ip} 5001")
    dt = time.monotonic() - t0 - overhead
    return mib / dt


def c2c_rtt(e, client, ip):
    out = e.docker("exec", client, "ping", "-c", "20", "-i", "0.2", ip).stdout
    m = re.search(r"= [\d.]+/([\d.]+)/", out)
    return float(m.group(1)) * 1000 if m else float("nan")


def measure(e, rounds, mib):
    e.docker("run", "-d", "--name", "sink", "busybox", "sh", "-c",
             "nc -ll -p 5001 -e sh -c 'cat >/dev/null' & nc -ll -p 5002 -e cat")
    e.docker("run", "-d", "--name", "client", "busybox", "sleep", "100000")
    wait_port(e, "sink", 5001)
    wait_port(e, "sink", 5002)
    ip = ip_of(e, "sink")
    r = {"host->ctr MB/s": [], "host<->ctr RTT us": [], "ctr->ctr MB/s": [], "ctr<->ctr RTT us": []}
    for _ in range(rounds):
        r["host->ctr MB/s"].append(host_throughput(ip, mib))
        r["host<->ctr RTT us"].append(host_rtt(ip))
        r["ctr->ctr MB/s"].append(c2c_throughput(e, "client", ip, mib))
        r["ctr<->ctr RTT us"].append(c2c_rtt(e, "client", ip))
    e.docker("rm", "-f", "sink", "client")
    return {k: statistics.median(v) for k, v in r.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--no-dockerd", action="store_true")
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="vnet", dir="/tmp")
    engines = []
    bridge = "vbenchd0"
    try:
        image = os.path.join(tmp, "bb.tar")
        subprocess.run([sys.executable, os.path.join(HERE, "scripts/make-busybox-image.py"), image], check=True)
        vessel = os.path.join(HERE, "target/release/vessel")
        v = Engine("vessel", tmp, [vessel, "daemon", "-H", f"unix://{tmp}/v.sock", "--data-root", f"{tmp}/v"],
                   f"{tmp}/v.sock")
        engines.append(v)
        d = None
        if not a.no_dockerd and shutil.which("dockerd"):
            subprocess.run(["ip", "link", "add", bridge, "type", "bridge"], check=False, capture_output=True)
            subprocess.run(["ip", "addr", "replace", "10.252.0.1/24", "dev", bridge], check=True)
            subprocess.run(["ip", "link", "set", bridge, "up"], check=True)
            d = Engine("dockerd", tmp, ["dockerd", "-H", f"unix://{tmp}/d.sock", "--data-root", f"{tmp}/d",
                                        "--exec-root", f"{tmp}/dx", "--pidfile", f"{tmp}/d.pid", "--bridge", bridge,
                                        "--iptables=false", "--ip-masq=false", "--ip-forward=false"],
                       f"{tmp}/d.sock")
            engines.append(d)
        elif not a.no_dockerd:
            print("dockerd not installed (apt-get install docker.io): Vessel figures only", file=sys.stderr)
        for e in engines:
            e.docker("load", "-q", "-i", image)
        results = {e.name: measure(e, a.rounds, a.mib) for e in engines}
        print(f"\nTCP over container networks, medians of {a.rounds} rounds, {a.mib} MiB per throughput run")
        names = list(results)
        print(f"  {'':22}" + "".join(f"{n:>14}" for n in names) + ("   ratio" if len(names) == 2 else ""))
        for k in results[names[0]]:
            row = f"  {k:22}" + "".join(f"{results[n][k]:14.1f}" for n in names)
            if len(names) == 2:
                row += f"   {results[names[0]][k] / results[names[1]][k]:5.2f}"
            print(row)
    finally:
        for e in engines:
            e.stop()
        subprocess.run(["pkill", "-9", "-f", tmp], capture_output=True)
        subprocess.run(["ip", "link", "del", bridge], capture_output=True)
        subprocess.run(["umount", "-R", f"{tmp}/dx"], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
