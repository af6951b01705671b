#!/usr/bin/env python3
"""Pull benchmark: a multi-layer image of about 100 MB from a local registry.

Builds an image (the busybox layer plus three layers of incompressible data,
~33 MB each), starts Debian's docker-registry on a free loopback port,
pushes the image there through Vessel, then times `docker pull` of it on an
empty store, RUNS times, for Vessel and, where Debian's docker.io is
installed, for dockerd side by side (alternating). Prints medians.
Usage: scripts/bench-pull.py [--runs 5] [--layer-mb 33] [--no-dockerd]
Needs scripts/setup.sh to have run.
"""
import argparse
import hashlib
import io
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(HERE, "scripts"))
from benchlib import Engine  # noqa: E402


def noise_layer(seed, size):
    """A layer tar holding one file of incompressible (random) bytes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        ti = tarfile.TarInfo(f"data/blob{seed}")
        payload = os.urandom(size)
        ti.size, ti.mode, ti.mtime = len(payload), 0o644, 0
        tar.addfile(ti, io.BytesIO(payload))
    return buf.getvalue()


def build_archive(path, layer_mb):
    base = os.path.join(path, "bb.tar")
    subprocess.run([sys.executable, os.path.join(HERE, "scripts/make-busybox-image.py"), base], check=True)
    with tarfile.open(base) as t:
        manifest = json.load(t.extractfile("manifest.json"))
        bb_layer = t.extractfile(manifest[0]["Layers"][0]).read()
    layers = [bb_layer] + [noise_layer(i, layer_mb << 20) for i in range(3)]
    diff_ids = ["sha256:" + hashlib.sha256(l).hexdigest() for l in layers]
    config = {"architecture": "amd64", "os": "linux", "config": {"Cmd": ["sh"]},
              "rootfs": {"type": "layers", "diff_ids": diff_ids},
              "history": [{"created_by": f"layer {i}"} for i in range(len(layers))]}
    cbytes = json.dumps(config).encode()
    cname = hashlib.sha256(cbytes).hexdigest() + ".json"
    out = os.path.join(path, "big.tar")
    with tarfile.open(out, "w") as t:
        def add(name, data):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            t.addfile(ti, io.BytesIO(data))
        names = []
        for d, l in zip(diff_ids, layers):
            n = d.split(":")[1] + "/layer.tar"
            add(n, l)
            names.append(n)
        add(cname, cbytes)
        add("manifest.json", json.dumps([{"Config": cname, "RepoTags": ["bench/big:1"], "Layers": names}]).encode())
    return out, sum(len(l) for l in layers)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--layer-mb", type=int, default=33)
    ap.add_argument("--no-dockerd", action="store_true")
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="vpull", dir="/tmp")
    engines, reg = [], None
    try:
        archive, size = build_archive(tmp, a.layer_mb)
        port = free_port()
        cfg = os.path.join(tmp, "registry.yml")
        open(cfg, "w").write(f"version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {tmp}/reg\n"
                             f"http:\n  addr: 127.0.0.1:{port}\n")
        reg = subprocess.Popen(["/usr/bin/docker-registry", "serve", cfg], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        v = Engine("vessel", tmp, [os.path.join(HERE, "target/release/vessel"), "daemon", "-H", f"unix://{tmp}/v.sock",
                                   "--data-root", f"{tmp}/v", "--vm-templates=false"], f"{tmp}/v.sock")
        engines.append(v)
        d = None
        if not a.no_dockerd and shutil.which("dockerd"):
            d = Engine("dockerd", tmp, ["dockerd", "-H", f"unix://{tmp}/d.sock", "--data-root", f"{tmp}/d",
                                        "--exec-root", f"{tmp}/dx", "--pidfile", f"{tmp}/d.pid", "--bridge", "none",
                                        "--iptables=false", "--ip-masq=false"], f"{tmp}/d.sock")
            engines.append(d)
        ref = f"127.0.0.1:{port}/bench/big:1"
        v.docker("load", "-q", "-i", archive)
        v.docker("tag", "bench/big:1", ref)
        t0 = time.monotonic()
        v.docker("push", ref)
        push_s = time.monotonic() - t0
        v.docker("rmi", "bench/big:1", ref)
        times = {"vessel": [], "dockerd": []}
        for _ in range(a.runs):
            for e in engines:
                e.docker("rmi", "-f", ref, check=False)
                e.docker("image", "prune", "-a", "-f", check=False)
                t0 = time.monotonic()
                e.docker("pull", ref)
                times[e.name].append(time.monotonic() - t0)
        print(f"== docker pull of a 4-layer image, {size / 1e6:.0f} MB uncompressed, from a loopback registry "
              f"({a.runs} runs, alternating; medians)")
        print(f"  push (Vessel, once)      {push_s:6.2f} s")
        vm = statistics.median(times["vessel"])
        print(f"  Vessel pull              {vm:6.2f} s   (min {min(times['vessel']):.2f}, max {max(times['vessel']):.2f})")
        if d:
            dm = statistics.median(times["dockerd"])
            print(f"  dockerd pull             {dm:6.2f} s   (min {min(times['dockerd']):.2f}, max {max(times['dockerd']):.2f})")
            print(f"  ratio Vessel / dockerd   {vm / dm:6.2f}")
    finally:
        for e in engines:
            e.stop()
        if reg:
            reg.kill()
            reg.wait()
        subprocess.run(["pkill", "-9", "-f", tmp])
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
