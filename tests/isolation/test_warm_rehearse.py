"""A warm job process rehearses its job's start while it waits (isolation/zygote.py
``_rehearse``): the copy-on-write faults of the J's parse and the environment's swap are
taken before W, off the job's path."""

from __future__ import annotations

import os
import resource

from sandmill.isolation import zygote

ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8",
       "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1"}
J = (b'{"dir": "/job/job-0123456789ab", "mount": "/job", "argv": ["wrapper.py"], "env": '
     + zygote.json.dumps(ENV).encode() + b', "rlimits": [[1, 65, 66], [3, 0, 0]], "tmp_bytes": 67108864,'
     b' "hostname": null, "exec": null, "mounts": []}')


def _faults_on_the_path(rehearse: bool) -> int:
    """Minor faults of a forked child's J parse and environment swap (p50 of 15 forks)."""
    counts = []
    for _ in range(15):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                if rehearse:
                    zygote._rehearse()
                before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                job = zygote.json.loads(J)
                os.environ.clear()
                os.environ.update(job["env"])
                n = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
                os.write(w, str(n).encode())
            finally:
                os._exit(0)
        os.close(w)
        counts.append(int(os.read(r, 32)))
        os.close(r)
        os.waitpid(pid, 0)
    return sorted(counts)[len(counts) // 2]


def test_the_rehearsal_takes_the_faults_of_the_jobs_start_before_it() -> None:
    cold, rehearsed = _faults_on_the_path(False), _faults_on_the_path(True)
    assert rehearsed * 2 <= cold, (cold, rehearsed)


def test_the_rehearsal_leaves_no_environment() -> None:
    saved = dict(os.environ)
    try:
        zygote._rehearse()
        assert dict(os.environ) == {}  # the job's comes whole with its J
    finally:
        os.environ.update(saved)
