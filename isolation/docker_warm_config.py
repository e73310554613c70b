"""What a warm Docker container is (``docker_warm.py``): its host config, its seccomp
profile, the boot program that hands the zygote its socket, and the probe program.

A warm container runs one zygote (``zygote.py``) that clones each job process into
fresh user, mount, pid, net, ipc and uts namespaces. Docker's defaults forbid that to a
container without CAP_SYS_ADMIN, so the warm container differs from a cold job's in
exactly these ways (isolation/README.md, "Warm Docker", says why neither weakens a job):

- seccomp: ``WARM_SECCOMP`` instead of Docker's default. Docker's default allows
  ``unshare``/``mount``/``umount2``/``clone`` with namespace flags only with
  CAP_SYS_ADMIN; this profile allows them (the zygote's job processes need them, and do
  them inside their own user namespace) and refuses the syscalls that widen the kernel's
  attack surface without any capability (bpf, perf_event_open, userfaultfd, io_uring,
  keyctl, ptrace, process_vm_*, ...) and everything that needs a capability the
  container never has (modules, kexec, reboot, clock, swap, quota, ...).
- on a host with AppArmor, no AppArmor profile (docker-default denies mount(2); the rest
  of its rules are writes the job's uid cannot make anyway and ptrace, which seccomp
  refuses here).
- /proc is not masked (``MaskedPaths`` only /sys's two, ``ReadonlyPaths`` none): the
  kernel lets a user namespace mount a fresh proc only where no part of proc is covered
  ("systempaths=unconfined"). Each job mounts its own /proc over it.

Everything else is a cold container's: no capabilities, no-new-privileges, uid 65534,
read-only root, no network, docker-init.
"""

from __future__ import annotations

import json
from typing import Any

from docker.types import LogConfig, Ulimit

from .docker_config import WORKDIR

MIB = 1024 * 1024

# Refused with EPERM in warm containers (x86_64 and aarch64 names; a name this kernel
# lacks is skipped by runc).
DENIED = sorted({
    # need capabilities the container never has; refused outright all the same
    "acct", "clock_adjtime", "clock_adjtime64", "clock_settime", "clock_settime64", "create_module",
    "delete_module", "finit_module", "init_module", "ioperm", "iopl", "kexec_file_load", "kexec_load",
    "lookup_dcookie", "nfsservctl", "pivot_root", "quotactl", "quotactl_fd", "reboot", "settimeofday",
    "stime", "swapoff", "swapon", "syslog", "_sysctl", "vhangup", "fanotify_init", "open_by_handle_at",
    "name_to_handle_at", "chroot", "setns",
    # kernel attack surface reachable without capabilities (also refused by Docker's default)
    "add_key", "keyctl", "request_key", "bpf", "perf_event_open", "userfaultfd", "ptrace",
    "process_vm_readv", "process_vm_writev", "kcmp", "get_kernel_syms", "query_module", "uselib",
    "ustat", "sysfs", "vm86", "vm86old", "mbind", "set_mempolicy", "move_pages",
    "get_mempolicy", "io_uring_setup", "io_uring_enter", "io_uring_register",
    # the new mount API (the zygote uses mount(2) only)
    "fsopen", "fsconfig", "fsmount", "fspick", "move_mount", "open_tree", "mount_setattr",
})

# clone3 answers ENOSYS (as under Docker's default), so libc falls back to clone, whose
# flags a seccomp filter can see.
WARM_SECCOMP: dict[str, Any] = {
    "defaultAction": "SCMP_ACT_ALLOW",
    "syscalls": [
        {"names": DENIED, "action": "SCMP_ACT_ERRNO", "errnoRet": 1},
        {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38},
    ],
}

# Not /proc's masks: they would forbid the job's own proc mount. /sys's stay.
MASKED_PATHS = ["/sys/firmware", "/sys/devices/virtual/powercap"]

# Runs first in the container: connect to the worker's socket in the bind-mounted dir,
# receive the zygote's end of its socket pair at the fd number the worker names, exec
# the zygote (argv[2:]). The worker learns our pid from the connection.
BOOT = """import os, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
msg, fds, _, _ = socket.recv_fds(s, 64, 1)
s.close()
want = int(msg)
if fds[0] != want:
    os.dup2(fds[0], want)
    os.close(fds[0])
os.set_inheritable(want, True)
os.execv(sys.argv[2], sys.argv[2:])
"""

# The warm probe: what a job process does first (zygote.py), in a warm container.
PROBE = """import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
uid, gid = os.getuid(), os.getgid()
def check(rc, what):
    if rc != 0:
        e = ctypes.get_errno()
        print(f"{what}: {os.strerror(e)}"); sys.exit(1)
check(libc.unshare(0x10000000 | 0x00020000 | 0x20000000 | 0x40000000 | 0x08000000 | 0x04000000), "unshare")
for f, t in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
    with open(f"/proc/self/{f}", "w") as fh:
        fh.write(t)
pid = os.fork()
if pid == 0:
    check(libc.mount(None, b"/", None, ctypes.c_ulong(16384 | (1 << 18)), None), "mount --make-rprivate /")
    check(libc.mount(b"proc", b"/proc", b"proc", ctypes.c_ulong(14), None), "mount proc")
    check(libc.mount(b"tmpfs", b"/tmp", b"tmpfs", ctypes.c_ulong(6), b"size=65536"), "mount tmpfs")
    print("ok"); sys.stdout.flush(); os._exit(0)
_, st = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(st))
"""

# Finds a program in the image: argv = [PATH, name, ...]; prints a JSON list (path or "").
WHICH = """import json, os, shutil, sys
out = []
for n in sys.argv[2:]:
    p = n if os.path.isabs(n) else shutil.which(n, path=sys.argv[1])
    out.append(p if p and os.path.isfile(p) and os.access(p, os.X_OK) else "")
print(json.dumps(out))
"""


def warm_host_config(zdir: str | None, memory_mb: int, apparmor: bool = False) -> dict[str, Any]:
    """``create_host_config`` keyword arguments of a warm container (``zdir``, the
    zygote's jobs dir, bound rw at /work; None for the probe). Its memory and pids are
    the outer bound of the zygote (each job's own limits are its job cgroup's).
    ``apparmor``: dockerd confines containers with AppArmor, whose docker-default
    profile denies mount(2): the warm container runs without it (README, "Warm Docker")."""
    security = ["no-new-privileges", "seccomp=" + json.dumps(WARM_SECCOMP)]
    if apparmor:
        security.append("apparmor=unconfined")
    host: dict[str, Any] = dict(
        binds={zdir: {"bind": WORKDIR, "mode": "rw"}} if zdir else {},
        network_mode="none",
        read_only=True,
        tmpfs={"/tmp": "rw,nosuid,nodev,mode=1777,size=1m"},
        cap_drop=["ALL"],
        security_opt=security,
        init=True,
        log_config=LogConfig(type="none"),
        ulimits=[Ulimit(name="core", soft=0, hard=0)],
        mem_limit=memory_mb * MIB,
        memswap_limit=memory_mb * MIB,
        pids_limit=16,  # docker-init, the boot program (then the zygote), a probe's child
    )
    return host


def with_paths(host: dict[str, Any]) -> dict[str, Any]:
    """The host config as sent (a ``create_host_config`` result) plus the proc masks
    left off: the SDK has no argument for ``MaskedPaths``/``ReadonlyPaths``."""
    host["MaskedPaths"] = list(MASKED_PATHS)
    host["ReadonlyPaths"] = []
    return host
