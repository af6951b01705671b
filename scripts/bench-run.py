#!/usr/bin/env python3
"""Benchmark: `docker run --rm busybox true` against a fresh Vessel daemon.

Prints the median wall time seen by the docker CLI over N runs and the
median of each stage the daemon measures:
  create    POST /containers/create (config merge, writable disk)
  disk      boot disk of the image (cached after the first build)
  spawn     starting the QEMU process
  boot      kernel boot until the guest agent answers
  exec      process spec sent until the process runs
  run       process running until its exit is reported
  teardown  VM shutdown, state saved, container removed
Usage: scripts/bench-run.py [RUNS]   (needs scripts/setup.sh to have run)
"""
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = int(sys.argv[1]) if len(sys.argv) > 1 else 10


def main() -> None:
    tmp = tempfile.mkdtemp(prefix="vbench", dir="/tmp")
    sock = os.path.join(tmp, "d.sock")
    log_path = os.path.join(tmp, "daemon.log")
    env = dict(os.environ, DOCKER_HOST="unix://" + sock, DOCKER_CONFIG=os.path.join(tmp, "cfg"))
    daemon = subprocess.Popen(
        [os.path.join(HERE, "target/release/vessel"), "daemon", "-H", "unix://" + sock, "--data-root", os.path.join(tmp, "data")],
        stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
    try:
        for _ in range(300):
            if subprocess.run(["docker", "version"], env=env, capture_output=True).returncode == 0:
                break
            time.sleep(0.1)
        image = os.path.join(tmp, "bb.tar")
        subprocess.run([sys.executable, os.path.join(HERE, "scripts/make-busybox-image.py"), image], check=True)
        subprocess.run(["docker", "load", "-q", "-i", image], env=env, check=True, capture_output=True)
        # Warm-up: builds the image's boot disk and fills caches.
        subprocess.run(["docker", "run", "--rm", "busybox", "true"], env=env, check=True)
        open(log_path, "w").close()
        walls = []
        for _ in range(RUNS):
            t0 = time.monotonic()
            subprocess.run(["docker", "run", "--rm", "busybox", "true"], env=env, check=True)
            walls.append(time.monotonic() - t0)
        stages = {k: [] for k in ["create", "disk", "spawn", "boot", "exec", "run", "teardown"]}
        text = re.sub(r"\x1b\[[0-9;]*m", "", open(log_path).read())
        for key, field in [("create", "create_ms"), ("disk", "disk_ms"), ("spawn", "spawn_ms"), ("boot", "boot_ms"),
                           ("exec", "exec_ms"), ("run", "run_ms"), ("teardown", "teardown_ms")]:
            stages[key] = [int(v) for v in re.findall(field + r"=(\d+)", text)]
        accel = re.findall(r'accel="?(\w+)', open(os.path.join(tmp, "daemon.log")).read() or "") or ["?"]
        print(f"docker run --rm busybox true, {RUNS} runs (Vessel, {subprocess.run(['docker', 'info', '-f', '{{.DefaultRuntime}}'], env=env, capture_output=True, text=True).stdout.strip()})")
        print(f"  wall (CLI)  median {statistics.median(walls) * 1000:7.0f} ms   min {min(walls) * 1000:7.0f}   max {max(walls) * 1000:7.0f}")
        for k, v in stages.items():
            if v:
                print(f"  {k:<10}  median {statistics.median(v):7.0f} ms")
        del accel
    finally:
        daemon.send_signal(signal.SIGKILL)
        daemon.wait()
        subprocess.run(["pkill", "-9", "-f", os.path.join(tmp, "data")])
        time.sleep(0.3)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
