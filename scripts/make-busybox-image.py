#!/usr/bin/env python3
"""Writes a `docker save`-format archive of a small busybox image made from
Debian's busybox-static, so that Vessel can be tried and tested without any
registry.  Usage: make-busybox-image.py OUT.tar [TAG ...] (default busybox:latest).
"""
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import time

BUSYBOX = "/bin/busybox"


def layer_tar() -> bytes:
    buf = io.BytesIO()
    # Deterministic: the same busybox gives the same image id every time.
    now = int(os.stat(BUSYBOX).st_mtime)
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        def add_dir(name, mode=0o755):
            ti = tarfile.TarInfo(name)
            ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, mode, now
            tar.addfile(ti)

        def add_file(name, data, mode=0o644):
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.mtime = len(data), mode, now
            tar.addfile(ti, io.BytesIO(data))

        for d in ["bin", "etc", "root", "home", "home/user", "var", "usr", "usr/bin", "proc", "sys", "dev"]:
            add_dir(d, 0o700 if d == "root" else 0o755)
        add_dir("tmp", 0o1777)
        with open(BUSYBOX, "rb") as f:
            add_file("bin/busybox", f.read(), 0o755)
        applets = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True, check=True).stdout.split()
        for a in applets:
            if a == "busybox":
                continue
            ti = tarfile.TarInfo("bin/" + a)
            ti.type, ti.linkname, ti.mode, ti.mtime = tarfile.SYMTYPE, "busybox", 0o777, now
            tar.addfile(ti)
        add_file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"
                               b"user:x:1000:1000:user:/home/user:/bin/sh\n"
                               b"nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n")
        add_file("etc/group", b"root:x:0:\nusers:x:100:user\nuser:x:1000:\nnogroup:x:65534:\n")
    return buf.getvalue()


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit("usage: make-busybox-image.py OUT.tar [TAG ...]")
    out, tags = sys.argv[1], sys.argv[2:] or ["busybox:latest"]
    layer = layer_tar()
    diff_id = "sha256:" + hashlib.sha256(layer).hexdigest()
    config = {
        "architecture": "amd64",
        "os": "linux",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(os.stat(BUSYBOX).st_mtime)),
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": ["sh"],
        },
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created_by": "make-busybox-image.py from Debian busybox-static"}],
    }
    config_bytes = json.dumps(config).encode()
    config_hex = hashlib.sha256(config_bytes).hexdigest()
    layer_dir = diff_id.split(":")[1]
    manifest = [{"Config": config_hex + ".json", "RepoTags": tags, "Layers": [layer_dir + "/layer.tar"]}]
    with tarfile.open(out, mode="w") as tar:
        for name, data in [
            (config_hex + ".json", config_bytes),
            (layer_dir + "/layer.tar", layer),
            ("manifest.json", json.dumps(manifest).encode()),
        ]:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))


if __name__ == "__main__":
    main()
