#!/usr/bin/env python3
"""Start-up benchmark: Vessel (VM templates), Vessel (cold boot) and, where
Debian's docker.io is installed, dockerd + runc, side by side in one run.

Prints medians and the ratio Vessel / dockerd+runc for
  * `docker run --rm busybox true` (runs alternate: Vessel, dockerd, Vessel
    with template clones only, ...), and Vessel back to back (no pause, so
    its warm VM is still being made when the next run comes)
  * `docker run -d busybox sleep 1000` followed by `docker exec ... true`
  * host memory per idle container (PSS of everything the container costs on
    the host: its QEMU process and what the daemon grew by for Vessel, with
    warm VMs and with plain template clones; the shim and the container's
    processes for dockerd), and how many such containers fit in host memory
  * N idle containers (`docker run -d busybox sleep 100000`) started in a row:
    time, total host memory, and the CPU they and the engine use while idle
    (over 10 s); for Vessel under software emulation, measured again once
    the daemon has given back every idle VM's translated code
  * cold boot versus template clone versus warm VM for Vessel alone.
Usage: scripts/bench-startup.py [--runs 10] [--idle 100] [--no-dockerd]
Needs scripts/setup.sh to have run; installs Debian's docker.io for the peer
(unless --no-dockerd) and keeps its service disabled.
"""
import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(HERE, "scripts"))
from benchlib import TRIMMED, Engine, busybox_image, stop_all, vessel_engine, wait_for_templates  # noqa: E402


def pss_kib(pid):
    try:
        for line in open(f"/proc/{pid}/smaps_rollup"):
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_ticks(pid):
    """User plus system CPU time of a process (all its threads), in clock ticks."""
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])


def idle_cpu_percent(pids, seconds=10):
    """Share of one host CPU that `pids` used together over `seconds` of idling."""
    before = sum(cpu_ticks(p) for p in pids)
    time.sleep(seconds)
    after = sum(cpu_ticks(p) for p in pids)
    return (after - before) / os.sysconf("SC_CLK_TCK") / seconds * 100


def descendants(pid):
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            kids = open(f"/proc/{p}/task/{p}/children").read().split()
        except OSError:
            kids = []
        for k in kids:
            out.append(int(k))
            todo.append(int(k))
    return out


def vessel_container_pids(engine, ids):
    return [int(engine.docker("inspect", "-f", "{{.State.Pid}}", i).stdout.strip()) for i in ids]


def dockerd_container_pids(ids):
    """The shim of each container and everything under it."""
    pids = []
    for line in subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout.splitlines():
        for i in ids:
            if "containerd-shim" in line and i in line:
                shim = int(line.split()[0])
                pids += [shim] + descendants(shim)
    return pids


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--idle", type=int, default=100)
    ap.add_argument("--no-dockerd", action="store_true")
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="vstart", dir="/tmp")
    engines = []
    try:
        image = busybox_image(tmp)
        v = vessel_engine("vessel", tmp)
        engines.append(v)
        vc = vessel_engine("vessel-clone", tmp, "--warm-vms", "0")
        engines.append(vc)
        cold = vessel_engine("vessel-cold", tmp, "--vm-templates=false")
        engines.append(cold)
        d = None
        if not a.no_dockerd and not shutil.which("dockerd"):
            print("installing Debian's docker.io for the side-by-side figures", file=sys.stderr)
            subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "docker.io"],
                           env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"), check=False,
                           stdout=subprocess.DEVNULL)
            subprocess.run(["systemctl", "disable", "--now", "docker.service", "docker.socket", "containerd.service"],
                           capture_output=True)
        if not a.no_dockerd and shutil.which("dockerd"):
            d = Engine("dockerd", tmp, ["dockerd", "-H", f"unix://{tmp}/d.sock", "--data-root", f"{tmp}/d",
                                        "--exec-root", f"{tmp}/dx", "--pidfile", f"{tmp}/d.pid", "--bridge", "none",
                                        "--iptables=false", "--ip-masq=false"], f"{tmp}/d.sock")
            engines.append(d)
        for e in engines:
            e.docker("load", "-q", "-i", image)
        wait_for_templates([v, vc], seconds=120)
        net = ["--network", "none"]
        for e in engines:  # warm-up: boot disks, page cache
            e.docker("run", "--rm", *(net if e is d else []), "busybox", "true")

        runs = {"vessel": [], "dockerd": [], "vessel-clone": [], "vessel-cold": [], "back-to-back": []}
        for _ in range(a.runs):
            runs["vessel"].append(v.timed("run", "--rm", "busybox", "true"))
            if d:
                runs["dockerd"].append(d.timed("run", "--rm", *net, "busybox", "true"))
            runs["vessel-clone"].append(vc.timed("run", "--rm", "busybox", "true"))
        for _ in range(max(3, a.runs // 3)):
            runs["vessel-cold"].append(cold.timed("run", "--rm", "busybox", "true"))
        boots = re.findall(r'boot="(\w+)"', open(v.log).read())
        clone_boots = re.findall(r'boot="(\w+)"', open(vc.log).read())
        for _ in range(a.runs):
            runs["back-to-back"].append(v.timed("run", "--rm", "busybox", "true"))

        print(f"== docker run --rm busybox true ({a.runs} runs, alternating; medians)")
        vm = med(runs["vessel"])
        print(f"  Vessel (warm VM)         {vm * 1000:7.0f} ms   [{boots.count('warm')} warm, {boots.count('clone')} clones, {boots.count('cold')} cold boots]")
        if d:
            dm = med(runs["dockerd"])
            print(f"  dockerd + runc           {dm * 1000:7.0f} ms   (--network none)")
            print(f"  ratio Vessel / dockerd   {vm / dm:7.2f}")
        cm = med(runs["vessel-clone"])
        print(f"  Vessel (clone, --warm-vms 0) {cm * 1000:5.0f} ms   [{clone_boots.count('clone')} clones, {clone_boots.count('cold')} cold boots]")
        if d:
            print(f"  ratio clone / dockerd    {cm / dm:7.2f}")
        print(f"  Vessel (cold boot)       {med(runs['vessel-cold']) * 1000:7.0f} ms   ({len(runs['vessel-cold'])} runs)")
        print(f"  speed-up over cold: clone {med(runs['vessel-cold']) / cm:.1f}x, warm VM {med(runs['vessel-cold']) / vm:.1f}x")
        print(f"  Vessel back to back      {med(runs['back-to-back']) * 1000:7.0f} ms   (no pause between runs)")

        print(f"== docker run -d busybox sleep 1000, then docker exec ... true ({a.runs} runs each; medians)")
        execs = {}
        for e in [v] + ([d] if d else []):
            both, only = [], []
            for _ in range(a.runs):
                t0 = time.monotonic()
                cid = e.docker("run", "-d", *(net if e is d else []), "busybox", "sleep", "1000").stdout.strip()
                t1 = time.monotonic()
                e.docker("exec", cid, "true")
                both.append(time.monotonic() - t0)
                only.append(time.monotonic() - t1)
                e.docker("rm", "-f", cid)
            execs[e.name] = med(only)
            print(f"  {e.name:<8} run -d + exec {med(both) * 1000:6.0f} ms; exec alone {med(only) * 1000:5.0f} ms")
        if d:
            print(f"  ratio Vessel / dockerd (exec alone) {execs['vessel'] / execs['dockerd']:5.2f}")

        print(f"== {a.idle} idle containers started in a row (docker run -d busybox sleep 100000)")
        avail = int(re.search(r"MemTotal:\s+(\d+)", open("/proc/meminfo").read()).group(1)) / 1024
        # Vessel twice: with warm VMs (each container gets a VM whose start
        # path was run ahead, so its translated code is larger under TCG)
        # and with plain clones. A Vessel container's cost is its QEMU
        # process plus what the daemon grew by; the one warm VM waiting
        # for the next container is left out.
        for e in [v, vc] + ([d] if d else []):
            ids = []
            daemon_before = pss_kib(e.proc.pid) if e is not d else 0
            trims_before = open(e.log).read().count(TRIMMED) if e is not d else 0
            t0 = time.monotonic()
            for _ in range(a.idle):
                ids.append(e.docker("run", "-d", *(net if e is d else []), "busybox", "sleep", "100000").stdout.strip())
            took = time.monotonic() - t0
            time.sleep(2)
            pids = dockerd_container_pids(ids) if e is d else vessel_container_pids(e, ids)

            def report(label):
                daemon = (pss_kib(e.proc.pid) - daemon_before) / 1024 if e is not d else 0
                total = sum(pss_kib(p) for p in pids) / 1024 + daemon
                each = total / a.idle
                # Idle CPU: the containers' processes and the engine's daemons
                # (dockerd and containerd for the peer).
                daemons = [e.proc.pid] + (descendants(e.proc.pid) if e is d else [])
                cpu = idle_cpu_percent(pids + [p for p in daemons if p not in pids])
                extra = f" (daemon +{daemon:.1f} MiB)" if e is not d else ""
                print(f"  {label:<22} host memory (PSS) {total:8.1f} MiB in all{extra}, {each:6.1f} MiB per idle "
                      f"container, {avail / each:6.0f} would fit; idle CPU {cpu:5.1f}% of one core in all")

            print(f"  {e.name:<12} {took:6.1f} s in all ({took / a.idle * 1000:5.0f} ms each)")
            report("  just started")
            if e is not d and "(tcg" in open(e.log).read():
                # Under software emulation the daemon gives back an idle
                # VM's translated code after --tcg-trim-after (30 s by
                # default): wait for every container's trim.
                t1 = time.monotonic()
                while open(e.log).read().count(TRIMMED) - trims_before < a.idle and time.monotonic() - t1 < 120 + a.idle:
                    time.sleep(1)
                done = open(e.log).read().count(TRIMMED) - trims_before
                # A trimmed guest translates its idle paths again within
                # about a minute (~2.5 MB): measure once that has settled.
                time.sleep(60)
                report(f"  idle, {done} trimmed")
            for chunk in range(0, len(ids), 50):
                e.docker("rm", "-f", *ids[chunk:chunk + 50], check=False)
        print(f"  host memory {avail / 1024:.1f} GiB")
    finally:
        stop_all(engines, tmp)


if __name__ == "__main__":
    main()
