"""RunSpec.mounts on every backend: a host directory bound read-only (or writable) into
the sandbox; a mount that cannot be made is refused, never silently dropped."""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandmill.isolation import Backend, Mount, RunSpec, Status, get_backend

PY = "/usr/bin/python3"
PROBE = r"""
import os, sys
d = sys.argv[1]
print(open(os.path.join(d, "hello.txt")).read().strip())
try:
    open(os.path.join(d, "new.txt"), "w").write("x")
    print("WRITE-OK")
except OSError as e:
    print("WRITE-REFUSED", e.errno)
"""
BACKENDS = ("process", "nsjail", "docker")


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    b = get_backend(request.param)
    probe = b.probe()
    if not probe.available:
        if os.environ.get("CI"):
            pytest.fail(f"{request.param} unavailable in CI: {probe.reason}")
        pytest.skip(probe.reason)
    yield b
    b.close()


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A host dir every job uid can read and write (so only the mount can refuse a write),
    outside every path the process backend masks."""
    d = Path("/var/tmp") / f"sandmill-mount-test-{uuid.uuid4().hex[:8]}"
    d.mkdir(mode=0o777)
    d.chmod(0o777)
    (d / "hello.txt").write_text("hello from the host\n")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def spec(target: str, mounts: list[Mount]) -> RunSpec:
    return RunSpec(argv=[PY, "probe.py", target], files={"probe.py": PROBE.encode()},
                   env={"PATH": "/usr/bin:/bin"}, mounts=mounts)


async def test_read_only_mount(backend: Backend, shared_dir: Path) -> None:
    out = await backend.run(spec(str(shared_dir), [Mount(str(shared_dir), str(shared_dir))]))
    assert out.status is Status.success, (out.detail, out.stderr)
    lines = out.stdout.decode().splitlines()
    assert lines[0] == "hello from the host"
    assert lines[1] == f"WRITE-REFUSED {errno.EROFS}"
    assert not (shared_dir / "new.txt").exists()


async def test_writable_mount(backend: Backend, shared_dir: Path) -> None:
    out = await backend.run(spec(str(shared_dir), [Mount(str(shared_dir), str(shared_dir), writable=True)]))
    assert out.status is Status.success, (out.detail, out.stderr)
    assert out.stdout.decode().splitlines()[1] == "WRITE-OK"
    assert (shared_dir / "new.txt").read_text() == "x"


# process binds onto existing host paths only: its refusal is the last test here
@pytest.mark.parametrize("backend", ["nsjail", "docker"], indirect=True)
async def test_mount_at_another_path(backend: Backend, shared_dir: Path) -> None:
    target = f"/opt/sandmill-test-{uuid.uuid4().hex[:8]}"
    out = await backend.run(spec(target, [Mount(str(shared_dir), target)]))
    assert out.status is Status.success, (out.detail, out.stderr)
    assert out.stdout.decode().splitlines() == ["hello from the host", f"WRITE-REFUSED {errno.EROFS}"]


@pytest.mark.parametrize("mount, why", [
    (Mount("/no/such/dir-sandmill", "/opt/x"), "does not exist"),
    (Mount("/usr", "opt/x"), "not an absolute"),
    (Mount("/usr", "/opt/../tmp"), "not an absolute, normalised"),
    (Mount("/usr", "/tmp"), "the sandbox's own"),
])
async def test_bad_mount_refused(backend: Backend, mount: Mount, why: str) -> None:
    out = await backend.run(spec("/opt/x", [mount]))
    assert out.status is Status.sandbox_error
    assert why in out.detail


async def test_process_refuses_masked_or_missing_target(shared_dir: Path) -> None:
    b = get_backend("process")
    if not b.namespaces:
        pytest.skip("process backend without namespaces (not root)")
    try:
        out = await b.run(spec("/x", [Mount(str(shared_dir), "/opt/no-such-target-sandmill")]))
        assert out.status is Status.sandbox_error and "does not exist on the host" in out.detail
        out = await b.run(spec("/x", [Mount(str(shared_dir), "/root")]))
        assert out.status is Status.sandbox_error and "masks" in out.detail
    finally:
        b.close()
