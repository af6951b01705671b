#!/usr/bin/env bash
# The whole test suite: set-up (idempotent), lints, then every unit and
# end-to-end test. End-to-end tests boot real VMs.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
"$here/scripts/setup.sh"
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked -- --test-threads 2
