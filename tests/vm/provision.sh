#!/usr/bin/env bash
# What every test VM runs, Vagrant's and tests/vm/debian12.sh's alike: provision with the
# script CI uses (.ci/setup.sh), then run the isolation conformance suite with the
# interpreter it installed sandmill into. Run as root from the repo copy inside the VM.
#
#   bash tests/vm/provision.sh [pytest args]     # default: tests/isolation -q
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
echo "==> [vm] $(. /etc/os-release && echo "$PRETTY_NAME"), kernel $(uname -r)," \
     "cgroup $(stat -fc %T /sys/fs/cgroup), $(nproc) cpus"
bash .ci/setup.sh
PY="$(cat /etc/sandmill/python)"
[ $# -gt 0 ] || set -- tests/isolation -q
exec "$PY" -m pytest "$@"
