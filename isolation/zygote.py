# sandmill's warm interpreter (the "zygote"). It runs INSIDE a sandbox (nsjail, or the
# process backend's namespaces), as the unprivileged job uid, with the job's own Python:
# stdlib only, passed with `python -c`, never imported by the worker. Its messages with
# the worker (R, F, Z; W, J, E, M on each job process's own socket) are in
# isolation/README.md, "The zygote protocol"; isolation/launcher.c speaks them too.
#
# Each job process is cloned ahead of its job, while the job before it runs, straight
# into fresh user, mount, pid, ipc and uts namespaces (pid 1 there; the network namespace
# is the zygote's own, empty), from the same clean state: the zygote never reads a job's
# message, args or files. It mounts its own /proc and masks the mount roots (argv[5],
# keeping an O_PATH fd of each); on J it binds its own work dir over the shared jobs dir,
# binds its own read-only mounts from those fds, mounts a size-capped /tmp, sets the
# rlimits, drops every capability, and runs the script in-process or execs the program.
import atexit  # here, like resource: in a job process its import cost 0.3 ms (faults)
import ctypes
import gc
import json
import os
import resource  # here, not in each job process: an import per job cost it 0.2-0.5 ms
import select
import signal
import socket
import stat
import struct
import sys
import types

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID = 0x10000000, 0x20000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC, MS_PRIVATE = 2, 4, 8, 4096, 16384, 1 << 18
MS_RDONLY, MS_REMOUNT = 1, 32
ST_NOEXEC = 8
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS = 1, 4, 38
SIGKILL = 9
SETUP_FAILED = 121

_libc = ctypes.CDLL(None, use_errno=True)
_pylibc = ctypes.PyDLL(None, use_errno=True)
_pylibc.syscall.restype = ctypes.c_long
_pylibc.syscall.argtypes = [ctypes.c_long] * 6
_SYS_CLONE = {"x86_64": 56, "aarch64": 220}
SIGCHLD = 17


def _check(rc, what):
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def _mount(src, target, fstype, flags, data=None):
    enc = (lambda s: s.encode() if isinstance(s, str) else s)
    _check(_libc.mount(enc(src), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)),
           f"mount {target}")


def _prctl(op, arg):
    _check(_libc.prctl(op, ctypes.c_ulong(arg), 0, 0, 0), f"prctl {op}")


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


# Made once here: built in each job process, they cost it 0.2 ms (ctypes' pages copied).
_CAP_HDR, _CAP_DATA = _CapHeader(0x20080522, 0), (_CapData * 2)()


def _drop_caps():
    # The job runs without exec, so the kernel's exec-time capability rules never
    # apply: clear the sets ourselves (capset, _LINUX_CAPABILITY_VERSION_3).
    _CAP_HDR.version, _CAP_HDR.pid = 0x20080522, 0  # capset may write the version back
    _check(_libc.capset(ctypes.byref(_CAP_HDR), _CAP_DATA), "capset")


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)


# The runtime script (sandmill's python3 wrapper), the same for every job: compiled once
# here, not in every forked child (docs/performance.md).
RUNTIME = {}
# A runtime script with PREPARE_MARK runs its module body once here, as __name__
# "__sandmill_warm__" (definitions only: it must not run a job then), and each job calls
# its __sandmill_job__() in that module, copied by the fork: no class or function is made
# again per job (0.4-0.5 ms of the python3 wrapper's; docs/performance.md).
PREPARE_MARK = b"\n# sandmill: prepare-once\n"
PREPARED = {}  # source -> its module, prepared
ROOTS = []  # mount roots (see the top): masked in every job process, sources reached by fd


def main():
    sock = socket.socket(fileno=int(sys.argv[1]))
    for name in filter(None, sys.argv[2].split(",")):
        try:
            __import__(name)
        except Exception:
            pass
    if len(sys.argv) > 4 and sys.argv[3]:
        source = sys.argv[4].encode()
        RUNTIME[source] = compile(source, sys.argv[3], "exec")
        if PREPARE_MARK in source:
            _prepare(source, sys.argv[3])
    if len(sys.argv) > 5:
        ROOTS.extend(json.loads(sys.argv[5]))
    _prctl(PR_SET_DUMPABLE, 0)  # no same-uid process may ptrace or read our memory
    gc.collect()
    gc.freeze()  # the preloaded objects move to the permanent generation: less copy-on-write
    sock.send(b"R")  # SO_PASSCRED on the worker's end: it learns our pid from this
    poll = select.poll()
    poll.register(sock, select.POLLIN | select.POLLRDHUP)
    children = {}  # pidfd -> (pid, seq)
    seq = 0
    while True:
        for fd, ev in poll.poll():
            if fd in children:
                pid, n = children.pop(fd)
                poll.unregister(fd)
                os.close(fd)
                sock.send(b"Z" + struct.pack("ii", n, os.waitpid(pid, 0)[1]))
                continue
            if ev & (select.POLLRDHUP | select.POLLHUP | select.POLLERR):
                os._exit(0)  # the worker is gone: our job processes die with us
            msg, fds, _, _ = socket.recv_fds(sock, 16, 8)
            if msg == b"M" and fds:  # into the job cgroup that the next F's clone is born in
                for f in fds:  # "0": this thread moves itself (no global lock on cgroup v1)
                    os.write(f, b"0")  # a failure ends us: never clone into the wrong cgroup
                    os.close(f)
                sock.send(b"m")
                continue
            if msg != b"F" or len(fds) != 1:
                for f in fds:
                    os.close(f)
                continue
            seq += 1
            job_sock = socket.socket(fileno=fds[0])
            try:
                pid = _clone_job(sock, job_sock)
            except OSError as e:
                _report(job_sock, e)
                job_sock.close()
                sock.send(b"Z" + struct.pack("ii", seq, SETUP_FAILED << 8))
                continue
            job_sock.close()
            pidfd = os.pidfd_open(pid)
            children[pidfd] = (pid, seq)
            poll.register(pidfd, select.POLLIN)


def _clone_job(sock, job_sock):
    """Fork the job process straight into its new namespaces: clone(2) with the
    namespace flags, so it is pid 1 of its pid namespace without an intermediate
    process. Returns its pid (in the parent only)."""
    nr = _SYS_CLONE.get(os.uname().machine)
    if nr is None:
        raise OSError(f"no clone syscall number for {os.uname().machine}")
    uid, gid = os.getuid(), os.getgid()
    flags = CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS | SIGCHLD
    # Through PyDLL the GIL stays held: the child continues as this very thread.
    pid = _pylibc.syscall(nr, flags, 0, 0, 0, 0)
    if pid < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"clone: {os.strerror(e)}")
    if pid > 0:
        return pid
    try:  # the job process, pid 1 of its namespaces; os.fork's after-fork hooks did not run
        _prctl(PR_SET_PDEATHSIG, SIGKILL)
        sock.close()  # the zygote's socket: a job process speaks on its own
        random = sys.modules.get("random")
        if random is not None:
            random.seed()
        # Non-dumpable (inherited from the zygote), /proc/self/* would belong to a uid
        # not mapped here and the maps could not be written.
        _prctl(PR_SET_DUMPABLE, 1)
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"{uid} {uid} 1")
        _write("/proc/self/gid_map", f"{gid} {gid} 1")
    except BaseException as e:  # noqa: BLE001
        _report(job_sock, e)
        os._exit(SETUP_FAILED)
    _job(job_sock)  # never returns


def _report(sock, e, kind=b"E"):
    try:
        sock.send(kind + f"{type(e).__name__}: {e}".encode()[:4000])
    except OSError:
        pass


def _job(sock):
    """The job process: pid 1 of its namespaces. Set up, wait for the job, run it."""
    try:
        _prctl(PR_SET_PDEATHSIG, SIGKILL)
        _mount(None, "/", None, MS_REC | MS_PRIVATE)
        _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        roots = _mask_roots()
        _rehearse()
        sock.send(b"W")  # waiting (with our pid: the worker checks our cgroup)
        msg, fds, _, _ = socket.recv_fds(sock, 1 << 20, 3)
        if msg[:1] != b"J" or len(fds) != 3:
            raise RuntimeError("bad job message")
        job = json.loads(msg[1:])
        mount_at = job["mount"]
        # Sources first, while every path is still as the zygote sees it.
        sources = [_open_source(src, roots) for src, _ in job.get("mounts", ())]
        here = os.open(job["dir"], os.O_RDONLY | os.O_DIRECTORY)
        # Our dir over the shared jobs dir: the job sees only its own files there.
        _mount(f"/proc/self/fd/{here}", mount_at, None, MS_BIND)
        os.close(here)
        tmp = "mode=1777" + (f",size={job['tmp_bytes']}" if job.get("tmp_bytes") else "")
        _mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, tmp)
        if os.path.isdir("/dev/shm"):
            _mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, tmp)
        if sources:
            try:
                _bind_mounts(job["mounts"], sources, roots)
            except OSError as e:  # this job's mounts only: it runs cold, warm runs go on
                raise _Refused(str(e)) from None
        if job.get("hostname"):
            socket.sethostname(job["hostname"])
        os.chdir(mount_at)
        for res, soft, hard in job["rlimits"]:
            resource.setrlimit(res, (soft, hard))
        _drop_caps()
        _prctl(PR_SET_NO_NEW_PRIVS, 1)
        _prctl(PR_SET_DUMPABLE, 1)  # our own /proc/self again (the job's, not the zygote's)
        for i, fd in enumerate(fds):
            os.dup2(fd, i)
        sock.close()
        os.closerange(3, 1 << 16)
    except _Refused as e:
        _report(sock, e, b"M")
        os._exit(SETUP_FAILED)
    except BaseException as e:  # noqa: BLE001
        _report(sock, e)
        os._exit(SETUP_FAILED)
    if job.get("exec"):
        _exec(job)
    os._exit(_run(job))


# A J like the worker's, parsed once while the process waits for its own: the pages the
# parse writes (refcounts of the json module's objects) are copied now, not on the job's
# path (docs/performance.md, "Round 5").
_SAMPLE_J = (b'{"dir": "/j/job-0", "mount": "/j", "argv": ["w.py", "x"], "env": {"A": "b"}, '
             b'"rlimits": [[1, 2, 3]], "tmp_bytes": null, "hostname": null, "exec": null, "mounts": []}')


def _rehearse():
    """Before W: what every job's start does with job-independent data, so that its
    copy-on-write faults are taken while the process waits. The zygote's environment
    goes (the job's comes with J: nothing reads it before)."""
    json.loads(_SAMPLE_J)
    os.environ.clear()
    os.environ["SANDMILL"] = "1"
    os.environ.clear()


class _Refused(Exception):
    """This job's mounts cannot be made here (M): the worker runs it cold."""


def _mask_roots():
    """Before any job: an O_PATH fd of each mount root (the way to its sources), then an
    empty read-only tmpfs over it. Returns {root: fd}."""
    fds = {}
    for r in ROOTS:
        try:
            fds[r] = os.open(r, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:  # not in this sandbox: nothing to hide, no source there
            continue
        _mount("tmpfs", r, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=64k,nr_inodes=256,mode=755")
        _mount(None, r, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
    return fds


def _under(path, d):
    return path == d or path.startswith(d.rstrip("/") + "/")


def _open_source(src, roots):
    """An O_PATH fd of ``src`` as the zygote sees it: under a root through its fd (the
    mask covers the path), else by path."""
    try:
        for r, fd in roots.items():
            if _under(src, r):
                return os.open(os.path.relpath(src, r), os.O_PATH | os.O_CLOEXEC, dir_fd=fd)
        return os.open(src, os.O_PATH | os.O_CLOEXEC)
    except OSError as e:
        raise _Refused(f"mount source {src!r}: {e.strerror}") from None


def _bind_mounts(mounts, fds, roots):
    """Bind each source (by fd) at its target, read-only, nosuid, nodev. A missing target
    is created only inside a tmpfs this process mounted (a root's mask, /tmp, /dev/shm);
    anywhere else the job is refused (it runs cold)."""
    ours = [*roots, "/tmp", "/dev/shm"]
    opened = set()  # masks made writable for their mount points (read-only again after)
    for (src, target), fd in zip(mounts, fds):
        if not os.path.lexists(target):
            mine = next((d for d in ours if _under(target, d) and target != d), None)
            if mine is None:
                raise _Refused(f"mount target {target!r} does not exist in the warm sandbox")
            if mine in roots and mine not in opened:
                _mount(None, mine, None, MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV | MS_NOEXEC)
                opened.add(mine)
            os.makedirs(os.path.dirname(target), 0o755, exist_ok=True)
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                os.mkdir(target, 0o755)
            else:
                os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644))
        try:
            _mount(f"/proc/self/fd/{fd}", target, None, MS_BIND)
            # the source mount's locked flags (noexec) must stay; atime flags stay by default
            keep = MS_NOEXEC if os.statvfs(target).f_flag & ST_NOEXEC else 0
            _mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | keep)
        except OSError as e:
            raise _Refused(f"bind {src!r} at {target!r}: {e.strerror or e}") from None
        os.close(fd)
    for r in opened:
        _mount(None, r, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)


def _exec(job):
    """Become the job's program (a warm exec: fresh namespaces, no new interpreter)."""
    # Python ignores these at start; an exec'd program must get the defaults back.
    for sig in (signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(sig, signal.SIG_DFL)
    argv = job["exec"]
    try:
        os.execve(argv[0], argv, job["env"])
    except OSError as e:
        os.write(2, f"sandmill: cannot run {argv[0]}: {e.strerror}\n".encode())
    os._exit(127)


def _prepare(source, script):
    mod = types.ModuleType("__sandmill_warm__")
    mod.__file__ = script
    mod.__builtins__ = __builtins__
    try:
        exec(RUNTIME[source], mod.__dict__)
    except BaseException:  # noqa: BLE001 - its jobs run the whole script instead
        return
    if callable(mod.__dict__.get("__sandmill_job__")):
        mod.__name__ = "__main__"
        PREPARED[source] = mod


def _run(job):
    """Run the script as `python SCRIPT ARGS...` would, in this warm interpreter."""
    os.environ.clear()
    os.environ.update(job["env"])
    sys.argv = list(job["argv"])
    script = sys.argv[0]
    sys.path[0] = os.getcwd()
    extra = job["env"].get("PYTHONPATH")
    if extra:
        sys.path[1:1] = [p for p in extra.split(os.pathsep) if p]
    rc = 0
    try:
        with open(script, "rb") as f:
            source = f.read()
        main_mod = PREPARED.get(source)
        if main_mod is not None:
            sys.modules["__main__"] = main_mod
            main_mod.__sandmill_job__()
        else:
            main_mod = sys.modules["__main__"] = types.ModuleType("__main__")
            main_mod.__file__ = script
            main_mod.__builtins__ = __builtins__
            exec(RUNTIME.get(source) or compile(source, script, "exec"), main_mod.__dict__)
    except SystemExit as e:
        rc = _exit_code(e.code)
    except BaseException:  # noqa: BLE001 - as the interpreter itself reports it
        import traceback

        traceback.print_exc()
        rc = 1
    return _shutdown(rc)


def _exit_code(code):
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def _shutdown(rc):
    # What interpreter exit does: join non-daemon threads, run atexit, flush.
    try:
        threading = sys.modules.get("threading")
        if threading is not None:
            threading._shutdown()
        atexit._run_exitfuncs()
    except BaseException:  # noqa: BLE001
        rc = rc or 1
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except Exception:
            pass
    return rc


if __name__ == "__main__":
    main()
