"""isolation.docker_cgroup's readers on fake v1 and v2 trees: the parsing for the
hierarchy this host does not have (CI and the VMs run the other one for real)."""

from __future__ import annotations

from pathlib import Path

from sandmill.isolation import docker_cgroup as cg


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_v2_usage(tmp_path: Path) -> None:
    write(tmp_path / "cgroup.controllers", "cpu memory pids\n")
    d = tmp_path / "sandmill-docker" / "job1"
    write(d / "cpu.stat", "usage_usec 1234567\nuser_usec 1000000\nsystem_usec 234567\n")
    write(d / "memory.peak", "52428800\n")
    write(d / "memory.events", "low 0\nhigh 0\nmax 7\noom 1\noom_kill 1\noom_group_kill 0\n")
    assert cg.cgroup_version(str(tmp_path)) == 2
    u = cg.read_usage(cg.job_parent("job1"), root=str(tmp_path))
    assert (u.cpu_ns, u.peak_bytes, u.oom_kills) == (1234567000, 52428800, 1)


def test_v2_without_memory_peak_uses_current(tmp_path: Path) -> None:
    write(tmp_path / "cgroup.controllers", "cpu memory\n")
    d = tmp_path / "system.slice" / "docker-abc.scope"
    write(d / "memory.current", "4096\n")
    assert cg.scope_path("abc", root=str(tmp_path)) == "system.slice/docker-abc.scope"
    assert cg.read_usage("system.slice/docker-abc.scope", root=str(tmp_path)).peak_bytes == 4096


def test_v1_usage(tmp_path: Path) -> None:
    rel = "sandmill-docker/job2"
    write(tmp_path / "cpuacct" / rel / "cpuacct.usage", "987654321\n")
    write(tmp_path / "memory" / rel / "memory.max_usage_in_bytes", "1048576\n")
    write(tmp_path / "memory" / rel / "memory.oom_control", "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    assert cg.cgroup_version(str(tmp_path)) == 1
    u = cg.read_usage(rel, root=str(tmp_path))
    assert (u.cpu_ns, u.peak_bytes, u.oom_kills) == (987654321, 1048576, 2)


def test_missing_reads_zero_and_merge_keeps_max(tmp_path: Path) -> None:
    u = cg.read_usage("nope", root=str(tmp_path))
    assert u == cg.Usage()
    u.merge(cg.Usage(cpu_ns=5, peak_bytes=9))
    u.merge(cg.Usage(cpu_ns=3, peak_bytes=10, oom_kills=1))
    assert (u.cpu_ns, u.peak_bytes, u.oom_kills) == (5, 10, 1)


def test_remove_parent_v1_all_hierarchies(tmp_path: Path) -> None:
    for h in ("memory", "cpuacct", "pids"):
        (tmp_path / h / "sandmill-docker" / "job3").mkdir(parents=True)
    cg.remove_parent("job3", root=str(tmp_path))
    assert not any((tmp_path / h / "sandmill-docker" / "job3").exists() for h in ("memory", "cpuacct", "pids"))
