#!/usr/bin/env bash
# The debian12 test VM without Vagrant or a box download: build a Debian 12 system from
# Debian's packages (debootstrap), boot it with QEMU (KVM when /dev/kvm works, else
# software emulation, much slower) and run in it what `vagrant up debian12` runs,
# tests/vm/provision.sh, over a copy of this working tree. The VM is a real cgroup v2 host:
# systemd, its own kernel, the unified hierarchy. It reaches Debian's mirror and PyPI
# through QEMU's user-mode network, as a Vagrant VM would.
#
#   bash tests/vm/debian12.sh [pytest args]     # default: tests/isolation -q
#
# Knobs (environment):
#   VM_CACHE=/var/cache/sandmill-vm   the base system is built once and kept here
#   VM_MEM=4096  VM_CPUS=2  VM_DISK=16G  VM_TIMEOUT=3600 (seconds)
#   VM_ACCEL=auto|kvm|tcg             auto: KVM on bare metal, software emulation in a VM
#   VM_KEEP=1                         keep the run's disk image (its path is printed)
#   VM_LOG=FILE                       also copy the VM's own log of the run to FILE
#   MIRROR=http://deb.debian.org/debian
# Exit status: the suite's, read back from the VM's disk; 124 when the VM timed out,
# 125 when the VM ended without a result.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CACHE="${VM_CACHE:-/var/cache/sandmill-vm}"
MIRROR="${MIRROR:-http://deb.debian.org/debian}"
BASE="$CACHE/bookworm"

step() { echo "==> [vm-host] $*"; }
die() { echo "!!! [vm-host] $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (debootstrap and file owners in the disk image need it)"
[ "$(uname -m)" = x86_64 ] || die "x86_64 hosts only (the VM is amd64)"

# --- 1. host tools ----------------------------------------------------------------------
need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v debugfs >/dev/null || need+=(e2fsprogs)
[ -e /usr/share/keyrings/debian-archive-keyring.gpg ] || need+=(debian-archive-keyring)
if [ ${#need[@]} -gt 0 ]; then
    step "apt: installing ${need[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}"
fi

# --- 2. the base system, built once ------------------------------------------------------
if [ ! -e "$BASE/.complete" ]; then
    step "building the Debian 12 base system in $BASE (debootstrap, a few minutes)"
    rm -rf "$BASE.tmp"
    mkdir -p "$CACHE"
    debootstrap --variant=minbase \
        --include=linux-image-amd64,systemd-sysv,udev,iproute2,ca-certificates,kmod \
        bookworm "$BASE.tmp" "$MIRROR"
    echo sandmill-debian12 >"$BASE.tmp/etc/hostname"
    echo "/dev/vda / ext4 defaults 0 1" >"$BASE.tmp/etc/fstab"
    # QEMU's user network: DHCP from QEMU, its DNS forwarder at 10.0.2.3.
    printf '[Match]\nName=eth*\n\n[Network]\nDHCP=ipv4\n' >"$BASE.tmp/etc/systemd/network/10-qemu.network"
    echo "nameserver 10.0.2.3" >"$BASE.tmp/etc/resolv.conf"
    cat >"$BASE.tmp/etc/systemd/system/sandmill-vm.service" <<'UNIT'
[Unit]
Description=sandmill VM run: tests/vm/provision.sh, then power off
After=network-online.target
Wants=network-online.target

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/sandmill-vm-run
StandardOutput=tty
StandardError=tty
TTYPath=/dev/ttyS0
TimeoutStartSec=infinity

[Install]
WantedBy=multi-user.target
UNIT
    chroot "$BASE.tmp" systemctl enable -q systemd-networkd systemd-networkd-wait-online sandmill-vm
    chroot "$BASE.tmp" apt-get clean
    touch "$BASE.tmp/.complete"
    mv "$BASE.tmp" "$BASE"
fi

# --- 3. provisioned once per setup.sh, pyproject.toml and the image's build.sh ----------
# Its package and Python steps run here in a chroot, at native speed: under software
# emulation they would take most of an hour; so does the job image's debootstrap. In the
# VM, setup.sh finds them done and runs the rest (dockerd, importing the job image,
# cgroups), then the suite.
key="$(cat "$REPO/.ci/setup.sh" "$REPO/pyproject.toml" "$REPO/isolation/images/build.sh" | sha256sum | cut -c1-12)"
PROV="$CACHE/bookworm-$key"
copy_tree() {  # tracked and untracked-but-not-ignored files: a fresh clone plus local edits
    rm -rf "$1"; mkdir -p "$1"
    (cd "$REPO" && git ls-files -z -co --exclude-standard | tar --null -T - -cf -) | tar -C "$1" -xf -
}
if [ ! -e "$PROV/.complete" ]; then
    step "provisioning $PROV: .ci/setup.sh packages and Python steps in a chroot"
    find "$CACHE" -maxdepth 1 -name 'bookworm-*' -exec rm -rf {} +
    cp -a "$BASE" "$PROV.tmp"
    copy_tree "$PROV.tmp/vagrant"
    cp /etc/resolv.conf "$PROV.tmp/etc/resolv.conf"
    # Trust what this host trusts: behind a TLS-inspecting proxy PyPI is only reachable
    # with the proxy's CA, which this host's bundle has and a fresh Debian's lacks.
    cp /etc/ssl/certs/ca-certificates.crt "$PROV.tmp/etc/ssl/host-ca-bundle.crt"
    printf '[global]\ncert = /etc/ssl/host-ca-bundle.crt\n' >"$PROV.tmp/etc/pip.conf"
    printf '#!/bin/sh\nexit 101\n' >"$PROV.tmp/usr/sbin/policy-rc.d"  # start no service here
    chmod +x "$PROV.tmp/usr/sbin/policy-rc.d"
    for m in proc sys dev dev/pts; do mount --bind "/$m" "$PROV.tmp/$m"; done
    prov_rc=0
    chroot "$PROV.tmp" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root SETUP_STOP_AFTER=python \
        bash /vagrant/.ci/setup.sh || prov_rc=$?
    # The Docker job image's rootfs too; setup.sh in the VM imports it (ROOTFS_TAR).
    [ "$prov_rc" != 0 ] || chroot "$PROV.tmp" bash /vagrant/isolation/images/build.sh \
        --rootfs-only /var/cache/sandmill-job-rootfs.tar || prov_rc=$?
    for m in dev/pts dev sys proc; do umount "$PROV.tmp/$m"; done
    [ "$prov_rc" = 0 ] || die "provisioning in the chroot failed ($prov_rc)"
    rm -f "$PROV.tmp/usr/sbin/policy-rc.d"
    echo "nameserver 10.0.2.3" >"$PROV.tmp/etc/resolv.conf"
    chroot "$PROV.tmp" apt-get clean
    touch "$PROV.tmp/.complete"
    mv "$PROV.tmp" "$PROV"
fi

# KVM where it works. A nested /dev/kvm may open yet hang the guest once it leaves real
# mode (seen in a Firecracker VM): VM_ACCEL=tcg, software emulation, works everywhere.
case "${VM_ACCEL:-auto}" in
    kvm) accel=(-accel kvm -cpu host,-arch-capabilities) ;;
    tcg) accel=(-accel tcg -cpu max) ;;
    *) if [ -w /dev/kvm ] && grep -qw -e vmx -e svm /proc/cpuinfo && ! grep -qw hypervisor /proc/cpuinfo; then
           accel=(-accel kvm -cpu host,-arch-capabilities)
       else
           accel=(-accel tcg -cpu max)
       fi ;;
esac
# Tests' wall-clock bounds (a timeout's kill within 5 s...) scale with it (tests/support.py).
slowdown=1; [ "${accel[1]}" = tcg ] && slowdown=4

# --- 4. this run's disk: that system, this working tree at /vagrant, the run script -------
RUN="$(mktemp -d "$CACHE/run.XXXXXX")"
cleanup() { [ "${VM_KEEP:-0}" = 1 ] && step "kept $RUN/disk.img" || rm -rf "$RUN"; }
trap cleanup EXIT
ROOT="$RUN/root"
step "preparing the disk image in $RUN"
cp -a "$PROV" "$ROOT"
copy_tree "$ROOT/vagrant"
[ $# -gt 0 ] || set -- tests/isolation -q
{
    echo '#!/bin/bash'
    echo 'cd /vagrant'
    echo 'export ROOTFS_TAR=/var/cache/sandmill-job-rootfs.tar'
    echo "export SANDMILL_TEST_SLOWDOWN=${SANDMILL_TEST_SLOWDOWN:-$slowdown}"
    printf 'bash tests/vm/provision.sh'; printf ' %q' "$@"; echo ' 2>&1 | tee /vm-log'
    echo 'echo "${PIPESTATUS[0]}" >/vm-rc'
    echo 'sync'
    echo 'systemctl poweroff'
} >"$ROOT/usr/local/sbin/sandmill-vm-run"
chmod +x "$ROOT/usr/local/sbin/sandmill-vm-run"
# No login prompt on the console: its getty would hang up the tty the run writes to.
ln -sf /dev/null "$ROOT/etc/systemd/system/serial-getty@ttyS0.service"
truncate -s "${VM_DISK:-16G}" "$RUN/disk.img"
mkfs.ext4 -q -F -L root -d "$ROOT" "$RUN/disk.img"
rm -rf "$ROOT"

# --- 5. boot ---------------------------------------------------------------------------
kernel="$(ls "$PROV"/boot/vmlinuz-* | sort -V | tail -n1)"  # the disk's own kernel
initrd="$(ls "$PROV"/boot/initrd.img-* | sort -V | tail -n1)"
step "booting: ${accel[*]}, ${VM_CPUS:-2} cpus, ${VM_MEM:-4096} MiB, timeout ${VM_TIMEOUT:-3600}s"
rc=0
timeout "${VM_TIMEOUT:-3600}" qemu-system-x86_64 "${accel[@]}" \
    -m "${VM_MEM:-4096}" -smp "${VM_CPUS:-2}" -display none -monitor none -serial stdio -no-reboot \
    -kernel "$kernel" -initrd "$initrd" \
    -append "root=/dev/vda rw console=ttyS0 quiet loglevel=3 systemd.show_status=false net.ifnames=0 panic=-1" \
    -drive "file=$RUN/disk.img,format=raw,if=virtio,cache=unsafe" \
    -netdev user,id=n0 -device virtio-net-pci,netdev=n0 </dev/null || rc=$?
if [ "$rc" = 124 ]; then
    echo "!!! [vm-host] the VM did not finish within ${VM_TIMEOUT:-3600}s" >&2
    exit 124  # as the header promises; die would say 1
fi

# --- 6. the result ------------------------------------------------------------------------
vm_rc="$(debugfs -R "cat /vm-rc" "$RUN/disk.img" 2>/dev/null | tr -dc 0-9)"
if [ -n "${VM_LOG:-}" ]; then
    debugfs -R "cat /vm-log" "$RUN/disk.img" >"$VM_LOG" 2>/dev/null && step "the VM's log: $VM_LOG"
fi
if [ -z "$vm_rc" ]; then
    echo "!!! [vm-host] the VM ended (qemu status $rc) without writing its result" >&2
    exit 125
fi
step "the suite in the VM exited with $vm_rc"
exit "$vm_rc"
