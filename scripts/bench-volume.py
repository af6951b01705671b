#!/usr/bin/env python3
"""Volume benchmark: sequential write and read throughput and the rate of
small-file creation, on a named volume and on a bind mount, for Vessel and,
where Debian's docker.io is installed, dockerd + runc side by side.

Each engine runs one container with a named volume at /vol and a host
directory bound at /bind; every figure is timed inside the container (so
`docker exec`'s own cost is left out):
  * write: dd of --mib MiB in 1 MiB blocks, then fsync (conv=fsync)
  * read: dd of that file back (the host's page cache holds it for both
    engines; Vessel's guest does not cache 9p reads)
  * small files: --files files of 4 KiB created by a shell loop, then sync
Prints medians of --runs runs.
Usage: scripts/bench-volume.py [--runs 3] [--mib 128] [--files 500] [--no-dockerd]
Needs scripts/setup.sh to have run (target/release/vessel, the guest in
$VESSEL_GUEST_DIR or /usr/local/lib/vessel).
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(HERE, "scripts"))
from benchlib import Engine, stop_all  # noqa: E402


def timed_ns(engine, cid, script):
    """Runs `script` in the container between two clock readings; seconds."""
    # busybox's date has no %N: /proc/uptime ticks in hundredths of seconds.
    out = engine.docker("exec", cid, "sh", "-c",
                        f"read s _ < /proc/uptime; {script}; read e _ < /proc/uptime; echo $s $e").stdout
    s, e = out.strip().splitlines()[-1].split()
    return max(float(e) - float(s), 0.01)


def measure(engine, cid, path, a):
    w, r, f = [], [], []
    for i in range(a.runs):
        engine.docker("exec", cid, "sh", "-c", f"rm -rf {path}/b {path}/small; mkdir {path}/small")
        w.append(a.mib / timed_ns(engine, cid, f"dd if=/dev/zero of={path}/b bs=1M count={a.mib} conv=fsync 2>/dev/null"))
        r.append(a.mib / timed_ns(engine, cid, f"dd if={path}/b of=/dev/null bs=1M 2>/dev/null"))
        f.append(a.files / timed_ns(engine, cid,
                                    f"cd {path}/small && i=0; while [ $i -lt {a.files} ]; do "
                                    f"head -c 4096 /dev/zero > f$i; i=$((i+1)); done; sync"))
    engine.docker("exec", cid, "sh", "-c", f"rm -rf {path}/b {path}/small")
    return statistics.median(w), statistics.median(r), statistics.median(f)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--mib", type=int, default=128)
    ap.add_argument("--files", type=int, default=500)
    ap.add_argument("--no-dockerd", action="store_true")
    ap.add_argument("--vessel", default=os.path.join(HERE, "target/release/vessel"))
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="vvol", dir="/tmp")
    engines = []
    try:
        image = os.path.join(tmp, "bb.tar")
        subprocess.run([sys.executable, os.path.join(HERE, "scripts/make-busybox-image.py"), image], check=True)
        guest = os.environ.get("VESSEL_GUEST_DIR", "/usr/local/lib/vessel")
        engines.append(Engine("vessel", tmp, [a.vessel, "daemon", "-H", f"unix://{tmp}/v.sock", "--data-root",
                                              f"{tmp}/v", "--guest-dir", guest], f"{tmp}/v.sock"))
        if not a.no_dockerd and shutil.which("dockerd"):
            engines.append(Engine("dockerd", tmp, ["dockerd", "-H", f"unix://{tmp}/d.sock", "--data-root", f"{tmp}/d",
                                                   "--exec-root", f"{tmp}/dx", "--pidfile", f"{tmp}/d.pid",
                                                   "--bridge", "none", "--iptables=false", "--ip-masq=false"],
                                  f"{tmp}/d.sock"))
        results = {}
        for e in engines:
            e.docker("load", "-q", "-i", image)
            bind = os.path.join(tmp, "bind-" + e.name)
            os.makedirs(bind)
            net = ["--network", "none"] if e.name == "dockerd" else []
            cid = e.docker("run", "-d", *net, "-v", "benchvol:/vol", "-v", f"{bind}:/bind", "busybox",
                           "sleep", "100000").stdout.strip()
            results[e.name] = {p: measure(e, cid, p, a) for p in ("/vol", "/bind")}
            e.docker("rm", "-f", cid)
        print(f"== volume I/O ({a.runs} runs, medians; write {a.mib} MiB with fsync, read it back, "
              f"{a.files} files of 4 KiB)")
        print(f"  {'':<20}{'write MiB/s':>12}{'read MiB/s':>12}{'files/s':>10}")
        for name, per in results.items():
            for path, label in (("/vol", "named volume"), ("/bind", "bind mount")):
                w, r, f = per[path]
                print(f"  {name + ' ' + label:<20}{w:12.1f}{r:12.1f}{f:10.0f}")
        if "dockerd" in results:
            for path, label in (("/vol", "named volume"), ("/bind", "bind mount")):
                v, d = results["vessel"][path], results["dockerd"][path]
                print(f"  ratio Vessel / dockerd, {label}: write {v[0] / d[0]:.2f}, read {v[1] / d[1]:.2f}, "
                      f"files {v[2] / d[2]:.2f}")
        print(f"  host: {os.cpu_count()} CPUs; {subprocess.run(['docker', 'info', '--format', '{{.DefaultRuntime}}'], env=engines[0].env, capture_output=True, text=True).stdout.strip()}")
    finally:
        stop_all(engines, tmp)


if __name__ == "__main__":
    main()
