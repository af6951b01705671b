#!/usr/bin/env bash
# Set-up and the main job, in one command:
#   1. installs and builds everything (scripts/setup.sh);
#   2. (re)starts the daemon with its defaults
#      (socket /run/vessel/vessel.sock, data root /var/lib/vessel; running
#      containers survive the restart);
#   3. makes a busybox image from Debian's busybox-static and loads it;
#   4. runs a container in its own VM that prints a greeting.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
"$here/scripts/setup.sh"

sock=/run/vessel/vessel.sock
pidfile=/run/vessel/vessel.pid
log=/var/log/vessel.log
export DOCKER_HOST=unix://$sock
mkdir -p /run/vessel
if [ -s "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    old=$(cat "$pidfile")
    echo "restarting the running Vessel daemon (pid $old)" >&2
    kill "$old"
    # Wait on the process, not the pid file: the daemon removes its pid file
    # as it begins to shut down, before it lets go of its state store.
    for _ in $(seq 300); do kill -0 "$old" 2>/dev/null || break; sleep 0.1; done
fi
nohup "$here/target/release/vessel" daemon -p "$pidfile" >>"$log" 2>&1 &
for _ in $(seq 300); do
    docker version >/dev/null 2>&1 && break
    sleep 0.1
done
docker version --format 'Vessel daemon up: {{.Server.Platform.Name}}, API {{.Server.APIVersion}}' \
    || { echo "the daemon did not start; see $log" >&2; exit 1; }

image=$(mktemp /tmp/vessel-busybox.XXXXXX.tar)
trap 'rm -f "$image"' EXIT
python3 "$here/scripts/make-busybox-image.py" "$image" busybox:latest
docker load -i "$image"
docker run --rm busybox sh -c 'echo "Hello from a Vessel VM! Guest kernel $(uname -r), $(nproc) vCPU, $(grep MemTotal /proc/meminfo | tr -s " ")"'
echo
echo "The daemon keeps running (log: $log). Use it with:"
echo "  export DOCKER_HOST=unix://$sock"
echo "  docker run --rm -it busybox sh"
