#!/usr/bin/env python3
"""Idle memory by QEMU build: for each QEMU binary given, a private Vessel
daemon running on it starts N idle containers (`docker run -d busybox sleep
100000`); once the daemon has trimmed every idle VM (under TCG) and a minute
has passed for the guests' idle code to be translated again, it prints the
host memory (PSS) per idle container and where it is, by mapping (QEMU's
anonymous memory, its heap, the template's memory file, the binary and its
libraries, the translated code). The daemons run side by side.

Usage: scripts/bench-idle-memory.py [--idle 10] [QEMU ...]
Default: Vessel's QEMU (/usr/local/lib/vessel/qemu-system-x86_64) and
Debian's (qemu-system-x86_64 from PATH). Needs scripts/setup.sh to have run.
"""
import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(HERE, "scripts"))
from benchlib import TRIMMED, busybox_image, stop_all, vessel_engine, wait_for_templates  # noqa: E402


def by_mapping(pid):
    """Pss and Private_Dirty (KiB) of process `pid`, by kind of mapping."""
    kinds = collections.defaultdict(lambda: [0, 0])
    kind = None
    for line in open(f"/proc/{pid}/smaps"):
        f = line.split()
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            path = f[5] if len(f) > 5 else ""
            if "memfd:tcg-jit" in line:
                kind = "translated code (memfd)"
            elif "/templates/" in path:
                kind = "template memory"
            elif path == "[heap]":
                kind = "heap"
            elif path.startswith("/"):
                kind = "binary: " + os.path.basename(path)
            elif path == "":
                kind = "anonymous " + f[1]
            else:
                kind = path
        elif f[0] == "Pss:":
            kinds[kind][0] += int(f[1])
        elif f[0] == "Private_Dirty:":
            kinds[kind][1] += int(f[1])
    return kinds


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--idle", type=int, default=10)
    ap.add_argument("qemu", nargs="*")
    a = ap.parse_args()
    qemus = a.qemu or ["/usr/local/lib/vessel/qemu-system-x86_64", shutil.which("qemu-system-x86_64")]
    tmp = tempfile.mkdtemp(prefix="vidle", dir="/tmp")
    engines = []
    try:
        image = busybox_image(tmp)
        for i, q in enumerate(qemus):
            e = vessel_engine(f"vessel{i}", tmp, "--qemu", q)
            engines.append(e)
            e.docker("load", "-q", "-i", image)
        wait_for_templates(engines)
        ids = {}
        for e in engines:
            e.docker("run", "--rm", "busybox", "true")  # boot disk, warm VM
            ids[e.name] = [e.docker("run", "-d", "busybox", "sleep", "100000").stdout.strip()
                           for _ in range(a.idle)]
        tcg = all("(tcg" in open(e.log).read() for e in engines)
        if tcg:
            t0 = time.monotonic()
            while (any(open(e.log).read().count(TRIMMED) < a.idle for e in engines)
                   and time.monotonic() - t0 < 120 + 2 * a.idle):
                time.sleep(1)
            # A trimmed guest translates its idle paths again within about a
            # minute: measure once that has settled.
            time.sleep(60)
        print(f"== {a.idle} idle containers per QEMU build, side by side"
              + (", after the idle trims" if tcg else ""))
        for e, q in zip(engines, qemus):
            version = subprocess.run([q, "--version"], capture_output=True, text=True).stdout.splitlines()[0]
            pids = [int(e.docker("inspect", "-f", "{{.State.Pid}}", c).stdout.strip()) for c in ids[e.name]]
            total = collections.defaultdict(lambda: [0, 0])
            for p in pids:
                for k, (pss, dirty) in by_mapping(p).items():
                    total[k][0] += pss
                    total[k][1] += dirty
            n = len(pids)
            pss = sum(v[0] for v in total.values()) / n / 1024
            dirty = sum(v[1] for v in total.values()) / n / 1024
            trims = open(e.log).read().count(TRIMMED)
            print(f"  {q}\n    {version}")
            print(f"    PSS {pss:5.1f} MiB per idle container ({dirty:4.1f} MiB private dirty); {trims} trims")
            for k, (p, d) in sorted(total.items(), key=lambda kv: -kv[1][0]):
                if p / n >= 100:
                    print(f"      {k:<34} PSS {p / n / 1024:5.2f} MiB, private dirty {d / n / 1024:5.2f} MiB")
    finally:
        stop_all(engines, tmp)


if __name__ == "__main__":
    main()
