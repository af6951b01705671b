"""What the benchmarks share: an engine daemon on a private socket and data
root, and the cleanup of what a Vessel daemon leaves on the host by design
(its bridges and firewall table outlive it, as Docker's networks do)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time


# What a Vessel daemon logs when it gave back an idle VM's translated code.
TRIMMED = "idle VM gave back its translated code"


HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def busybox_image(tmp):
    """Makes the busybox test image (a docker-save archive) in `tmp`."""
    image = os.path.join(tmp, "bb.tar")
    subprocess.run([sys.executable, os.path.join(HERE, "scripts/make-busybox-image.py"), image], check=True)
    return image


def vessel_engine(name, tmp, *flags):
    """A release Vessel daemon on its own socket and data root in `tmp`."""
    sock = f"{tmp}/{name}.sock"
    cmd = [os.path.join(HERE, "target/release/vessel"), "daemon", "-H", f"unix://{sock}",
           "--data-root", f"{tmp}/{name}", *flags]
    return Engine(name, tmp, cmd, sock)


def wait_for_templates(engines, seconds=180):
    """Waits until every Vessel daemon in `engines` has its VM template."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if all("VM template ready" in open(e.log).read() for e in engines):
            return
        time.sleep(0.2)


class Engine:
    """A daemon (Vessel or dockerd) started with `cmd`, answering on `sock`."""

    def __init__(self, name, tmp, cmd, sock):
        self.name, self.tmp, self.sock = name, tmp, sock
        self.env = dict(os.environ, DOCKER_HOST="unix://" + sock, DOCKER_CONFIG=os.path.join(tmp, "cfg-" + name))
        self.log = os.path.join(tmp, name + ".log")
        self.bridge = None
        self.proc = subprocess.Popen(cmd, stdout=open(self.log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
        for _ in range(600):
            if self.docker("version", check=False).returncode == 0:
                break
            time.sleep(0.1)
        else:
            raise SystemExit(f"{name} did not start; see {self.log}:\n" + open(self.log).read()[-2000:])
        if os.path.basename(cmd[0]) == "vessel":
            # The daemon names its default bridge; ask it rather than
            # repeating its naming rule here.
            self.bridge = self.docker("network", "inspect", "bridge", "-f",
                                      '{{index .Options "com.docker.network.bridge.name"}}').stdout.strip()

    def docker(self, *args, check=True):
        """Runs the docker CLI against this engine; exits with its error
        message when `check` and it fails."""
        r = subprocess.run(["docker", *args], env=self.env, capture_output=True, text=True)
        if check and r.returncode != 0:
            raise SystemExit(f"{self.name}: docker {' '.join(args)} failed: {r.stderr.strip()}")
        return r

    def timed(self, *args):
        t0 = time.monotonic()
        self.docker(*args)
        return time.monotonic() - t0

    def stop(self):
        """Stops the daemon, then removes a Vessel daemon's bridges and
        firewall table."""
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=20)
        except Exception:
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self.bridge:
            remove_vessel_networking(self.bridge)


def remove_vessel_networking(bridge):
    """Deletes the bridges and taps (marked with the aliases `vessel:<bridge>`
    and `vessel-tap:<bridge>`) and the nftables table of the Vessel daemon
    whose default bridge is `bridge`."""
    out = subprocess.run(["ip", "-j", "link", "show"], capture_output=True, text=True).stdout
    for link in json.loads(out or "[]"):
        if link.get("ifalias") in ("vessel:" + bridge, "vessel-tap:" + bridge):
            subprocess.run(["ip", "link", "del", link["ifname"]], capture_output=True)
    subprocess.run(["nft", "delete", "table", "inet", "vessel_" + bridge], capture_output=True)


def stop_all(engines, tmp):
    """Stops `engines`, kills what is left of their processes (VMs, shims),
    unmounts what dockerd left under `tmp/dx` and deletes `tmp`."""
    for e in engines:
        e.stop()
    subprocess.run(["pkill", "-9", "-f", tmp], capture_output=True)
    time.sleep(0.5)
    subprocess.run(["umount", "-R", f"{tmp}/dx"], capture_output=True)
    # Share mounts of a killed daemon's VMs: detach before deleting.
    for line in reversed(open("/proc/self/mountinfo").read().splitlines()):
        mp = line.split(" ")[4]
        if mp.startswith(tmp):
            subprocess.run(["umount", "-l", mp], capture_output=True)
    shutil.rmtree(tmp, ignore_errors=True)
