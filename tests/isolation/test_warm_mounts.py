"""Per-job mounts on the warm path (isolation/zygote.py, "Mount roots"): a job's read-only
mount from under a backend's ``warm_mount_roots`` runs warm on process and nsjail, and
the job sees exactly what the same job sees cold: its own mount, read-only, and nothing
else of the root (another environment beside it stays invisible)."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_conformance import explain, spec

from sandmill.isolation import Mount, Status
from sandmill.isolation.nsjail import NsjailBackend
from sandmill.isolation.process import ProcessBackend
from sandmill.isolation.warm import warm_mounts_problem

pytestmark = pytest.mark.timeout(90)

PROBE = r"""
import errno, json, os
def err(f):
    try:
        return f()
    except OSError as e:
        return errno.errorcode[e.errno]
r = {}
root, a, b = os.environ["ROOT"], os.environ["ENV_A"], os.environ["ENV_B"]
r["listing"] = err(lambda: sorted(os.listdir(root)))
r["read"] = err(lambda: open(os.path.join(a, "hello.txt")).read())
r["write"] = err(lambda: open(os.path.join(a, "new.txt"), "w") and "done")
r["mkdir"] = err(lambda: os.mkdir(os.path.join(root, "C")) or "done")
r["other"] = err(lambda: os.listdir(b))
r["other_file"] = err(lambda: open(os.path.join(b, "secret.txt")).read())
try:
    import mod_a
    r["import"] = mod_a.VALUE
except ImportError as e:
    r["import"] = "ImportError"
print(json.dumps(r))
"""


@pytest.fixture
def root() -> Iterator[Path]:
    """A mount root with two environments, A and B, readable by the job uid, outside
    every path the process backend masks."""
    top = Path("/var/tmp") / f"sandmill-warm-mounts-{uuid.uuid4().hex[:8]}"
    r = top / "envs"
    for name in ("A", "B"):
        (r / name).mkdir(parents=True)
    (r / "A" / "hello.txt").write_text("env A")
    (r / "A" / "mod_a.py").write_text("VALUE = 'from A'\n")
    (r / "B" / "secret.txt").write_text("env B")
    for d in (top, r, r / "A", r / "B"):
        d.chmod(0o755)
    yield r
    shutil.rmtree(top, ignore_errors=True)


def _usable(cls, **kw):
    b = cls(**kw)
    probe = b.probe()
    if not probe.available or (kw.get("warm", True) and b.warm_pool is None):
        b.close()
        why = f"{cls.name}: no warm interpreters here ({probe.reason or 'not root or no cgroups'})"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI runs the warm suite, but {why}")
        pytest.skip(why)
    return b


@pytest.fixture(params=["process", "nsjail"])
def pair(request, root: Path):
    """(warm backend, cold backend) of one kind, both with ``root`` as a mount root."""
    cls = ProcessBackend if request.param == "process" else NsjailBackend
    warm = _usable(cls, warm_mount_roots=[str(root)])
    cold = _usable(cls, warm=False, warm_mount_roots=[str(root)])
    yield warm, cold
    warm.close()
    cold.close()


def _job(root: Path, mounts: list[Mount]):
    a = str(root / "A")
    return spec(PROBE, mounts=mounts,
                env={"ROOT": str(root), "ENV_A": a, "ENV_B": str(root / "B"), "PYTHONPATH": a})


def _result(o) -> dict:
    assert o.status is Status.success, explain(o)
    return json.loads(o.stdout.decode().strip().splitlines()[-1])


async def test_a_mount_under_the_root_runs_warm_and_sees_what_cold_sees(pair, root: Path) -> None:
    warm, cold = pair
    a = str(root / "A")
    w = await warm.run(_job(root, [Mount(a, a)]))
    c = await cold.run(_job(root, [Mount(a, a)]))
    assert w.warm is True, (explain(w), warm.warm_pool.disabled)
    assert c.warm is False
    got = _result(w)
    assert got == {"listing": ["A"], "read": "env A", "write": "EROFS", "mkdir": "EROFS",
                   "other": "ENOENT", "other_file": "ENOENT", "import": "from A"}, got
    assert _result(c) == got
    assert not (root / "A" / "new.txt").exists() and not (root / "C").exists()
    # the next job of the same zygote gets its own view again (here: B, not A)
    b = str(root / "B")
    w2 = await warm.run(spec("import os; print(sorted(os.listdir(%r)), open(%r).read())"
                             % (str(root), f"{b}/secret.txt"), mounts=[Mount(b, b)]))
    assert w2.warm and w2.stdout.decode().strip() == "['B'] env B", explain(w2)


async def test_a_job_without_mounts_sees_no_environment(pair, root: Path) -> None:
    warm, cold = pair
    for b in (warm, cold):
        o = await b.run(_job(root, []))
        got = _result(o)
        assert o.warm is (b is warm)
        # masked by an empty tmpfs (warm, and cold on process), or not there (cold nsjail)
        assert got["listing"] in ([], "ENOENT") and got["read"] == "ENOENT", got
        assert got["other"] == "ENOENT" and got["import"] == "ImportError", got


async def test_a_writable_mount_runs_cold(pair, root: Path) -> None:
    warm, _ = pair
    a = str(root / "A")
    (root / "A").chmod(0o777)
    o = await warm.run(spec("open(%r, 'w').write('x'); print('ok')" % f"{a}/new.txt",
                            mounts=[Mount(a, a, writable=True)]))
    assert o.status is Status.success and o.warm is False, explain(o)
    assert (root / "A" / "new.txt").read_text() == "x"


async def test_nsjail_a_source_outside_the_roots_runs_cold(root: Path) -> None:
    b = _usable(NsjailBackend, warm_mount_roots=[str(root)])
    other = root.parent / "elsewhere"
    other.mkdir(mode=0o755)
    (other / "f.txt").write_text("outside")
    try:
        o = await b.run(spec("print(open(%r).read())" % f"{other}/f.txt",
                             mounts=[Mount(str(other), str(other))]))
        assert o.status is Status.success and o.warm is False, explain(o)
        assert o.stdout.decode().strip() == "outside"
    finally:
        b.close()


async def test_nsjail_a_target_the_job_cannot_create_runs_cold_and_warm_goes_on(root: Path) -> None:
    """/opt/... is not in a tmpfs the job process mounted: it refuses, the job runs cold,
    the warm interpreter stays (the next job is warm again)."""
    b = _usable(NsjailBackend, warm_mount_roots=[str(root)])
    target = f"/opt/sandmill-test-{uuid.uuid4().hex[:8]}"
    try:
        o = await b.run(spec("print(open(%r).read())" % f"{target}/hello.txt",
                             mounts=[Mount(str(root / "A"), target)]))
        assert o.status is Status.success and o.warm is False, explain(o)
        assert o.stdout.decode().strip() == "env A"
        assert b.warm_pool.disabled is None
        again = await b.run(spec("print('ok')"))
        assert again.warm is True, explain(again)
    finally:
        b.close()


def test_which_mounts_can_be_warm(root: Path) -> None:
    a = str(root / "A")
    (root / "link").symlink_to("/etc")
    roots = (str(root),)
    assert warm_mounts_problem([Mount(a, a)], roots) is None
    assert warm_mounts_problem([Mount(a, "/deps")], roots) is None
    assert "writable" in warm_mounts_problem([Mount(a, a, writable=True)], roots)
    assert "not a directory or a regular file" in warm_mounts_problem([Mount("/dev/null", "/dev/null")], roots)
    assert "outside the warm mount roots" in warm_mounts_problem([Mount("/etc", "/etc")], roots)
    assert warm_mounts_problem([Mount("/etc", "/etc")], roots, self_binds=True) is None
    assert "outside" in warm_mounts_problem([Mount(str(root / "link"), "/x")], roots)  # a symlink out
    assert "job's dir" in warm_mounts_problem([Mount(a, "/job/deps")], roots, job_dir="/job")
