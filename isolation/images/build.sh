#!/usr/bin/env bash
# Build the Docker job image (default sandmill/job:bookworm) without any registry:
# debootstrap a minimal Debian rootfs and `docker import` it.
#
# Idempotent: does nothing when the image already exists (FORCE=1 rebuilds).
# Needs root, debootstrap, and a Debian apt mirror (MIRROR, default deb.debian.org).
# Usage: isolation/images/build.sh [image-tag]
#        isolation/images/build.sh --rootfs-only FILE.tar   # the rootfs alone, no dockerd
# ROOTFS_TAR=FILE.tar: import that tarball (from --rootfs-only) instead of running
# debootstrap; the test VM (tests/vm/) makes it at native speed outside the VM.
set -euo pipefail

ROOTFS_ONLY=""
if [ "${1:-}" = --rootfs-only ]; then
    ROOTFS_ONLY="${2:?--rootfs-only needs a file name}"
    set --
fi
IMAGE="${1:-${SANDMILL_JOB_IMAGE:-sandmill/job:bookworm}}"
SUITE="${SUITE:-bookworm}"
MIRROR="${MIRROR:-http://deb.debian.org/debian}"
# What a job may rely on: both language runtimes of the default profile, plus the
# certificates that a network=host job needs for https.
PACKAGES="${PACKAGES:-bash,python3,ca-certificates}"
JOB_UID=65534

log() { echo "[build.sh] $*" >&2; }

docker_import() {  # a rootfs tarball on stdin -> the image
    docker import \
        --change "USER $JOB_UID:$JOB_UID" \
        --change "WORKDIR /work" \
        --change "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
        --change "ENV LANG=C.UTF-8" \
        --change 'CMD ["/bin/bash"]' \
        --change "LABEL org.sandmill.image=job org.sandmill.suite=$SUITE" \
        - "$IMAGE" >/dev/null
    log "built $IMAGE ($(docker image inspect -f '{{.Size}}' "$IMAGE") bytes)"
}

if [ -z "$ROOTFS_ONLY" ]; then
    if ! docker info >/dev/null 2>&1; then
        log "error: dockerd is not reachable (docker info failed)"; exit 1
    fi
    if [ "${FORCE:-0}" != "1" ] && docker image inspect "$IMAGE" >/dev/null 2>&1; then
        log "image $IMAGE already exists, nothing to do (FORCE=1 to rebuild)"
        exit 0
    fi
    if [ -n "${ROOTFS_TAR:-}" ] && [ -s "$ROOTFS_TAR" ]; then
        log "importing $ROOTFS_TAR into docker as $IMAGE"
        docker_import <"$ROOTFS_TAR"
        exit 0
    fi
fi
if [ "$(id -u)" != 0 ]; then
    log "error: debootstrap needs root"; exit 1
fi
command -v debootstrap >/dev/null || { log "error: debootstrap is not installed (apt-get install debootstrap)"; exit 1; }

# On Ubuntu hosts debootstrap needs Debian's key explicitly (debian-archive-keyring).
KEYRING_ARGS=()
if [ -f /usr/share/keyrings/debian-archive-keyring.gpg ]; then
    KEYRING_ARGS=(--keyring=/usr/share/keyrings/debian-archive-keyring.gpg)
fi

WORK="$(mktemp -d /tmp/sandmill-rootfs.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
ROOTFS="$WORK/rootfs"

log "debootstrap $SUITE ($PACKAGES) from $MIRROR into $ROOTFS (a few minutes)"
debootstrap --variant=minbase "${KEYRING_ARGS[@]}" --include="$PACKAGES" \
    "$SUITE" "$ROOTFS" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 || {
    log "error: debootstrap failed; last lines:"; tail -n 30 "$WORK/debootstrap.log" >&2; exit 1; }

log "trimming the rootfs"
# Nothing in a job needs apt state, docs or locales; a smaller image imports faster.
rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/* "$ROOTFS"/var/log/* \
       "$ROOTFS"/usr/share/doc/* "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/info/* \
       "$ROOTFS"/usr/share/locale/* "$ROOTFS"/tmp/* "$ROOTFS"/root/.cache
# Mount points the backend uses: /work (the job dir, bind-mounted) and /tmp (tmpfs).
mkdir -p "$ROOTFS/work"
chmod 1777 "$ROOTFS/tmp"
chown "$JOB_UID:$JOB_UID" "$ROOTFS/work"
# Docker writes these at start; empty files keep the image deterministic.
: >"$ROOTFS/etc/hostname"; : >"$ROOTFS/etc/resolv.conf"

if [ -n "$ROOTFS_ONLY" ]; then
    tar --numeric-owner -C "$ROOTFS" -cf "$ROOTFS_ONLY.tmp" . && mv "$ROOTFS_ONLY.tmp" "$ROOTFS_ONLY"
    log "wrote $ROOTFS_ONLY"
    exit 0
fi
log "importing into docker as $IMAGE"
tar --numeric-owner -C "$ROOTFS" -c . | docker_import
