#!/usr/bin/env bash
# Provision a machine to build and test sandmill: CI runners and the Vagrant VMs use
# this one script. Run as root from anywhere; safe to rerun (every step checks first).
#
#   bash .ci/setup.sh          # everything
#
# Steps: Debian packages -> Python env + `pip install -e '.[test,bench]'` -> dockerd up ->
# job image (isolation/images/build.sh) -> cgroup preparation.
# Works on Debian 12 and Ubuntu 24.04, cgroup v1 and v2, with or without systemd.
#
# Knobs (environment):
#   SANDMILL_VENV=/opt/sandmill-venv  venv used when the system python is externally
#                                     managed (PEP 668); SANDMILL_VENV=always forces one
#   PYTHON=python3                    interpreter to install into (>= 3.11)
#   DOCKERD_TIMEOUT=60                seconds to wait for a backgrounded dockerd
#   DOCKERD_ARGS=""                   extra dockerd flags when we start it ourselves
#   SKIP_IMAGE=1                      do not build the job image
#   SETUP_STOP_AFTER=python           stop after steps 1-2 (packages, Python env): used to
#                                     pre-provision a VM's disk in a chroot (tests/vm/)
# Output: the interpreter that has sandmill installed is written to /etc/sandmill/python
# (callers run "$(cat /etc/sandmill/python)" -m pytest ...).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV_DIR="${SANDMILL_VENV:-/opt/sandmill-venv}"
PYTHON="${PYTHON:-python3}"
DOCKERD_TIMEOUT="${DOCKERD_TIMEOUT:-60}"
DOCKERD_LOG="${DOCKERD_LOG:-/var/log/sandmill-dockerd.log}"
STATE_DIR=/etc/sandmill

step() { echo "==> [setup] $*"; }
die() { echo "!!! [setup] $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (apt, dockerd and cgroups need it)"
[ -r /etc/os-release ] && . /etc/os-release
step "host: ${PRETTY_NAME:-unknown}, kernel $(uname -r), repo $REPO"

# --- 1. Debian packages ------------------------------------------------------------
# docker.io: the Docker backend's daemon; debootstrap + debian-archive-keyring: build
# the job image without a registry (Ubuntu needs Debian's key for a bookworm rootfs);
# iproute2/procps/psmisc: netns and process inspection used by backends and tests;
# python3-venv/pip: the test environment; git: pip's editable install metadata.
PACKAGES=(docker.io debootstrap debian-archive-keyring iproute2 procps psmisc ca-certificates
          git python3 python3-venv python3-pip tar gzip
          chromium chromium-driver  # the dashboard's browser tests (tests/browser/, selenium)
          gcc libc6-dev  # builds the native exec zygote (isolation/launcher.c) on first use
          bash-builtins)  # bash's headers: warm bash (isolation/bash_zygote.c)
# A kernel with AppArmor on makes dockerd load its docker-default profile at every
# container start; without apparmor_parser each start fails ("AppArmor enabled on system
# but the docker-default profile could not be loaded"): a minimal Debian 12 has no parser.
if [ "$(cat /sys/module/apparmor/parameters/enabled 2>/dev/null)" = Y ]; then
    PACKAGES+=(apparmor)
fi
missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    step "apt: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Only refresh the index when it is missing or older than a day.
    if [ -z "$(find /var/lib/apt/lists -maxdepth 1 -name '*Packages*' -mtime -1 2>/dev/null | head -n1)" ]; then
        apt-get update -q
    fi
    apt-get install -y -q --no-install-recommends "${missing[@]}"
else
    step "apt: all packages present"
fi
# vagrant, where the distribution has it (Debian does; asked after the index refresh above):
# the test run checks the Vagrantfile with `vagrant validate` (no VM is started). Without
# it that one test is skipped, so a failure here does not stop the set-up.
if ! command -v vagrant >/dev/null && apt-cache policy vagrant 2>/dev/null | grep 'Candidate: [0-9]' >/dev/null; then
    step "apt: installing vagrant"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends vagrant \
        || step "vagrant not installed; the Vagrantfile's validate test will be skipped"
fi
# kubectl (Debian: kubernetes-client), where apt has it: tests/test_autoscale_deploy.py
# renders deploy/k8s with `kubectl kustomize`; without it that test is skipped.
if ! command -v kubectl >/dev/null && apt-cache policy kubernetes-client 2>/dev/null | grep 'Candidate: [0-9]' >/dev/null; then
    step "apt: installing kubernetes-client (kubectl)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends kubernetes-client \
        || step "kubectl not installed; the kustomize render test will be skipped"
fi

# --- 2. Python environment -----------------------------------------------------------
command -v "$PYTHON" >/dev/null || die "no $PYTHON on PATH"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "$PYTHON is $("$PYTHON" -V 2>&1); sandmill needs >= 3.11"
# PEP 668 (Debian 12, Ubuntu 24.04): the distro python refuses pip installs; use a venv.
managed="$("$PYTHON" -c 'import sys, sysconfig, os; print(int(sys.prefix == sys.base_prefix and os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED"))))')"
if [ "$managed" = 1 ] || [ "${SANDMILL_VENV:-}" = always ]; then
    [ "$VENV_DIR" = always ] && VENV_DIR=/opt/sandmill-venv
    if [ ! -x "$VENV_DIR/bin/python" ]; then
        step "python: creating venv $VENV_DIR ($PYTHON is externally managed)"
        "$PYTHON" -m venv "$VENV_DIR"
        "$VENV_DIR/bin/python" -m pip install -q --upgrade pip
    fi
    PY="$VENV_DIR/bin/python"
else
    PY="$(command -v "$PYTHON")"
    PY="$("$PY" -c 'import sys; print(sys.executable)')"
fi
# Reinstall only when pyproject.toml changed or the package is not importable.
stamp="$STATE_DIR/pip-$(echo "$PY" | md5sum | cut -c1-8).sha256"
want="$(sha256sum "$REPO/pyproject.toml" | cut -d' ' -f1)"
mkdir -p "$STATE_DIR"
# The bench extra too: the test run includes a smoke run of the benchmark set (its
# charts need matplotlib; its queue section runs the peer, pgqueuer).
# ...and only when the installed sandmill is this checkout's (another clone may have installed its own).
installed_from() { (cd / && "$PY" -c 'import os, sandmill.store, pytest, pgqueuer, matplotlib, importlinter, schemathesis, uv, jwt, selenium, prometheus_client, kubernetes, orjson, httptools; print(os.path.dirname(os.path.dirname(sandmill.store.__file__)))' 2>/dev/null); }
if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ] && [ "$(installed_from)" = "$REPO" ]; then
    step "python: sandmill already installed in $PY"
else
    step "python: pip install -e '.[test,bench]' into $PY"
    (cd "$REPO" && "$PY" -m pip install -q -e '.[test,bench]')
    echo "$want" >"$stamp"
fi
echo "$PY" >"$STATE_DIR/python"
if [ "${SETUP_STOP_AFTER:-}" = python ]; then
    step "stopping after the Python step (SETUP_STOP_AFTER=python)"
    exit 0
fi

# --- 3. dockerd ------------------------------------------------------------------------
# cgroup v2 inside a container without systemd: we sit in the root of our cgroup
# namespace, and v2 forbids enabling controllers for children of a cgroup that holds
# processes, so dockerd could not give containers memory/pids limits. Do what
# docker's own dind entrypoint does: move every process into an `init` leaf, then
# enable all controllers for the children. Only when controllers are not enabled yet.
v2_nest_root_processes() {
    local root=/sys/fs/cgroup
    [ -e "$root/cgroup.controllers" ] || return 0             # v1: nothing to do
    [ -d /run/systemd/system ] && return 0                     # systemd owns the tree
    grep -qw memory "$root/cgroup.subtree_control" 2>/dev/null && return 0
    [ -s "$root/cgroup.procs" ] || return 0
    step "cgroups: v2 without systemd: moving root processes to $root/init, enabling controllers"
    mkdir -p "$root/init"
    xargs -rn1 <"$root/cgroup.procs" sh -c 'echo "$0" >'"$root"'/init/cgroup.procs' 2>/dev/null || true
    sed -e 's/ / +/g' -e 's/^/+/' <"$root/cgroup.controllers" >"$root/cgroup.subtree_control" \
        || echo "!!! [setup] could not enable cgroup controllers; limits may not apply" >&2
}
if docker info >/dev/null 2>&1; then
    step "docker: dockerd already running"
else
    if [ -d /run/systemd/system ] && systemctl list-unit-files docker.service >/dev/null 2>&1; then
        step "docker: starting docker.service"
        systemctl enable --now docker.service || true
    fi
    if ! docker info >/dev/null 2>&1 && ! pgrep -x dockerd >/dev/null; then
        # No systemd (CI containers): background it ourselves, logs to a file.
        v2_nest_root_processes
        step "docker: starting dockerd in the background (log: $DOCKERD_LOG)"
        # shellcheck disable=SC2086 # DOCKERD_ARGS is a list of flags
        nohup dockerd ${DOCKERD_ARGS:-} >>"$DOCKERD_LOG" 2>&1 </dev/null &
    fi
    step "docker: waiting up to ${DOCKERD_TIMEOUT}s for docker info"
    for _ in $(seq "$DOCKERD_TIMEOUT"); do
        docker info >/dev/null 2>&1 && break
        sleep 1
    done
    if ! docker info >/dev/null 2>&1; then
        echo "--- last lines of $DOCKERD_LOG:" >&2
        tail -n 30 "$DOCKERD_LOG" >&2 2>/dev/null || true
        die "dockerd did not answer within ${DOCKERD_TIMEOUT}s (see $DOCKERD_LOG)"
    fi
fi
step "docker: $(docker info -f 'server {{.ServerVersion}}, cgroup v{{.CgroupVersion}} driver {{.CgroupDriver}}, storage {{.Driver}}')"

# --- 4. job image ---------------------------------------------------------------------
if [ "${SKIP_IMAGE:-0}" = 1 ]; then
    step "image: skipped (SKIP_IMAGE=1)"
else
    bash "$REPO/isolation/images/build.sh"
fi

# --- 5. cgroups -------------------------------------------------------------------------
if [ -e /sys/fs/cgroup/cgroup.controllers ]; then cgv=2; else cgv=1; fi
step "cgroups: v$cgv"
# The Docker backend needs nothing here: dockerd creates /sandmill-docker/<job> itself.

step "done. python: $PY (also in $STATE_DIR/python)"
