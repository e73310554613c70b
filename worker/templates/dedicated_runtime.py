# sandmill's dedicated runtime: one long-lived python3 process per script (and subworker)
# of a dedicated worker group. It runs INSIDE the group's sandbox as a warm job process
# (isolation/zygote.py: its own namespaces, job uid, job cgroup, no capabilities); stdlib
# only. The script's module is imported once per script version (hash); each job calls
# main(**args).
#
# The control channel is fd 0 as started (a unix stream socket to the worker), moved to a
# high fd; fd 0 becomes /dev/null. A job's prints never reach it: for each job the worker
# passes a pipe (SCM_RIGHTS) that becomes fd 1 and 2 while the job runs, and /dev/null
# again after it. Frames both ways: a header <length u32, kind u8, job id 16 bytes>, then
# `length` bytes of body.
#   worker -> runtime  M  body: hash (16 ascii) + script source     a version to serve
#                      J  body: hash (16 ascii) + args (JSON) + 1 fd  run a job
#   runtime -> worker  R                                              ready
#                      S                                              job started
#                      D  body: cpu + result (JSON)                  job succeeded
#                      E  body: cpu + {"name", "message", "stack"}   job failed (main raised)
#                      I  body: cpu + {"name", "message", "stack"}   the version's import failed
#                                                                     (its next jobs get E with
#                                                                     it, until M comes again)
# cpu: u32, the microseconds of CPU the runtime (its threads, and the children it waited
# for) used while the job ran: the job's cpu_ms.
# A job that exits (sys.exit, os._exit) ends the runtime with its code, as a standard job
# ends its process; the worker fails it with that and starts another runtime.
import os
import resource
import socket
import struct
import sys

# sandmill: include fastjson.py


HDR = struct.Struct("<IB16s")
CPU = struct.Struct("<I")
MAX_MODULES = 4  # versions kept imported at once (an older one is imported again if asked)


def _tb(exc=None):
    import traceback

    if exc is not None:
        return "".join(traceback.format_exception_only(exc))
    return traceback.format_exc()


def _cpu_s():
    s = resource.getrusage(resource.RUSAGE_SELF)
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def _err(name, message, tb=""):
    return _dumps({"name": str(name), "message": str(message), "stack": str(tb)})


class Runtime:
    def __init__(self):
        import fcntl
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        high = max(3, min(100, soft - 4)) if soft > 0 else 3
        ctl = fcntl.fcntl(0, fcntl.F_DUPFD_CLOEXEC, high)
        self.null = os.open(os.devnull, os.O_RDWR)
        os.set_inheritable(self.null, False)
        os.dup2(self.null, 0)
        self.sock = socket.socket(fileno=ctl)
        self.sock.setblocking(True)
        self.buf = bytearray()
        self.fds = []  # received, not yet given to a job (in order)
        self.sources = {}  # hash -> source
        self.mains = {}  # hash -> main (the newest MAX_MODULES)
        self.failed = {}  # hash -> import error (JSON), until the worker sends the source again

    def send(self, kind, jid, body=b""):
        self.sock.sendall(HDR.pack(len(body), kind[0], jid) + body)

    def recv(self):
        """One frame: (kind, job id, body); fds that came with it go to self.fds."""
        while True:
            if len(self.buf) >= HDR.size:
                n, kind, jid = HDR.unpack_from(self.buf)
                if len(self.buf) >= HDR.size + n:
                    body = bytes(self.buf[HDR.size:HDR.size + n])
                    del self.buf[:HDR.size + n]
                    return kind, jid, body
            data, fds, _flags, _addr = socket.recv_fds(self.sock, 1 << 20, 16)
            if not data:  # the worker is gone
                os._exit(0)
            self.buf += data
            self.fds += fds

    def main_of(self, h):
        """The version's main(), importing it once; raises _ImportFailed."""
        fn = self.mains.get(h)
        if fn is not None:
            return fn
        if h in self.failed:  # tried already: the worker sends the source again to retry
            raise _ImportFailed(self.failed[h], False)
        source = self.sources.get(h)
        if source is None:
            raise _ImportFailed(_err("ScriptNotLoaded", f"version {h} was not sent to this runtime"), False)
        module = {"__name__": "__sandmill_main__", "__file__": "main.py"}
        try:
            exec(compile(source, "main.py", "exec"), module)
        except BaseException as e:  # noqa: BLE001 - any error at import is the jobs' error
            if isinstance(e, SystemExit):
                raise
            tb = _tb()
            sys.stderr.write(tb)
            self.failed[h] = _err(type(e).__name__, str(e), tb)
            raise _ImportFailed(self.failed[h], True) from None
        fn = module.get("main")
        if not callable(fn):
            self.failed[h] = _err("NoMainFunction", "the script defines no main(...) function")
            raise _ImportFailed(self.failed[h], True)
        if len(self.mains) >= MAX_MODULES:
            self.mains.pop(next(iter(self.mains)))
        self.mains[h] = fn
        return fn

    def run_job(self, jid, body):
        h = body[:16].decode()
        out = self.fds.pop(0) if self.fds else self.null
        os.dup2(out, 1)
        os.dup2(out, 2)
        if out != self.null:
            os.close(out)
        self.send(b"S", jid)
        cpu0 = _cpu_s()
        kind, reply = b"E", b""
        try:
            try:
                fn = self.main_of(h)
                args = _loads(body[16:].decode())
            except _ImportFailed as e:  # I for a fresh attempt, E for one already reported
                kind, reply = (b"I" if e.args[1] else b"E"), e.args[0]
            else:
                kind, reply = self.call(fn, args)
        finally:
            for f in (sys.stdout, sys.stderr):
                try:
                    f.flush()
                except Exception:  # noqa: BLE001 - the job may have replaced or closed them
                    pass
            # the job's pipe is closed on our side before its result goes: all it printed
            # is in the pipe when the worker reads the result
            os.dup2(self.null, 1)
            os.dup2(self.null, 2)
        cpu = min(max(0, int((_cpu_s() - cpu0) * 1e6)), 0xFFFFFFFF)
        self.send(kind, jid, CPU.pack(cpu) + reply.encode("utf-8", "backslashreplace"))

    def call(self, fn, args):
        try:
            result = fn(**args)
        except TypeError as e:
            if e.__traceback__ is not None and e.__traceback__.tb_next is None:
                return b"E", _err("ArgumentError", f"main() does not take these args: {e}")
            tb = _tb()
            sys.stderr.write(tb)
            return b"E", _err(type(e).__name__, str(e), tb)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as e:  # noqa: BLE001
            tb = _tb()
            sys.stderr.write(tb)
            return b"E", _err(type(e).__name__, str(e), tb)
        try:
            return b"D", _dumps(result)
        except (TypeError, ValueError, RecursionError) as e:
            return b"E", _err("ResultNotSerializable", f"the result of main() is not JSON-serializable: {e}")

    def serve(self):
        sys.path.insert(0, os.getcwd())
        self.send(b"R", bytes(16))
        while True:
            kind, jid, body = self.recv()
            if kind == 77:  # M
                h = body[:16].decode()
                self.sources[h] = body[16:].decode("utf-8", "surrogateescape")
                self.failed.pop(h, None)
                self.mains.pop(h, None)
            elif kind == 74:  # J
                try:
                    self.run_job(jid, body)
                except SystemExit as e:
                    os._exit(_exit_code(e.code))


class _ImportFailed(Exception):
    pass


def _exit_code(code):
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    try:
        os.write(2, (str(code) + "\n").encode("utf-8", "backslashreplace"))
    except OSError:
        pass
    return 1


Runtime().serve()
