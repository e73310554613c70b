"""Conformance-suite plumbing: one parameter per backend present here, and each
(backend, case) that the backend's probe lists as a gap marked xfail(strict=True),
so a gap that starts passing is reported, never silently green.

Backends with warm interpreters (isolation/warm.py; docker: warm containers,
isolation/docker_warm.py) run the suite three times: cold (``warm=False``), warm
in-process (``<name>+warm``) and warm exec (``<name>+exec``); in the warm variants every
run must really have been warm (docker's are built with ``warm=True``). On process and
nsjail, ``+exec`` runs through the native exec zygote (isolation/launcher.c; required in
CI, where setup installs the compiler) and ``+pyexec`` through the Python one (jobs with
mounts of their own, hosts without a compiler); ``+bash`` runs each case's program from
a bash script (``exec "$@"``) that a warm bash runs in its clone (isolation/bash_zygote.c;
required in CI, where setup installs bash's headers)."""

from __future__ import annotations

import functools
import os

import pytest

from sandmill.isolation import launcher, workdir
from sandmill.isolation.base import CONFORMANCE_CASES, Backend, OutputCallback, Probe
from sandmill.isolation.registry import BACKENDS, backend_class
from sandmill.isolation.spec import Outcome, RunSpec
from sandmill.isolation.warm import BASH, NATIVE

WARM_BACKENDS = ("process", "nsjail", "docker")  # the ones with a ``warm`` option
WARM_BASH = "/bin/bash"
NATIVE_BACKENDS = ("process", "nsjail")  # their warm exec may use the native exec zygote


def variants() -> list[str]:
    """Every backend name, plus ``<name>+warm`` (the runtime script runs in a warm
    interpreter) and ``<name>+exec`` (a warm job process execs the program) for those
    with warm interpreters."""
    out = []
    for name in BACKENDS:
        out.append(name)
        if name in WARM_BACKENDS:
            out += [f"{name}+warm", f"{name}+exec"]
        if name in NATIVE_BACKENDS:
            out += [f"{name}+pyexec", f"{name}+bash"]
    return out


def base(variant: str) -> str:
    return variant.split("+")[0]


@functools.cache
def _probe(name: str) -> tuple[type[Backend] | None, Probe | None, str]:
    """(class, probe, why-unusable) for one backend, once per test process."""
    try:
        cls = backend_class(name)
    except Exception as e:  # e.g. isolation.docker not written yet, or SDK missing
        return None, None, f"{name} backend not importable: {type(e).__name__}: {e}"
    try:
        probe = cls().probe()
    except Exception as e:
        return cls, None, f"{name} probe failed: {type(e).__name__}: {e}"
    if not probe.available:
        return cls, probe, f"{name} unavailable here: {probe.reason}"
    return cls, probe, ""


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend_name" not in metafunc.fixturenames:
        return
    params = []
    for name in variants():
        _, _, why = _probe(base(name))
        # CI must not skip this suite: there, an unavailable backend fails its cases.
        marks = [pytest.mark.skip(reason=why)] if why and not _in_ci() else []
        params.append(pytest.param(name, id=name, marks=marks))
    metafunc.parametrize("backend_name", params)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is None or "backend_name" not in callspec.params:
            continue
        case = item.originalname.removeprefix("test_")  # type: ignore[attr-defined]
        assert case in CONFORMANCE_CASES, f"{item.name}: not a conformance case"
        _, probe, why = _probe(base(callspec.params["backend_name"]))
        if probe is not None and not why and case in probe.gaps:
            item.add_marker(pytest.mark.xfail(strict=True, reason=f"declared gap: {probe.gaps[case]}"))


class MustRunWarm(Backend):
    """A warm backend whose every run must have been warm (not a silent cold fallback)."""

    def __init__(self, inner: Backend, exec_: bool, native: bool = False, bash: bool = False) -> None:
        self.inner = inner
        self.exec = exec_
        self.native = native  # the exec must have gone through the native exec zygote
        self.bash = bash  # the program is exec'd by a script run in a warm bash's clone
        self.name = inner.name + ("+bash" if bash else "+exec" if exec_ else "+warm")

    def probe(self) -> Probe:
        return self.inner.probe()

    async def run(self, spec: RunSpec, on_output: OutputCallback | None = None) -> Outcome:
        assert spec.warm, "conformance specs name their runtime script"
        if self.exec:  # no runtime script: the warm job process execs python3
            spec.warm = None
        if self.bash:
            # gone before the program runs: the work dir holds the case's files only
            spec.files = {**spec.files, "bash-run.sh": b'rm -f bash-run.sh; exec "$@"\n'}
            spec.argv = [WARM_BASH, "bash-run.sh", *spec.argv]
        o = await self.inner.run(spec, on_output)
        pool = getattr(self.inner, "warm_pool", None)
        assert o.warm, f"ran cold: {pool.disabled if pool else 'no warm pool'}"
        if self.native:
            assert (NATIVE, b"") in pool.idle, "the exec did not use the native exec zygote"
        if self.bash:
            assert (BASH + WARM_BASH, b"") in pool.idle, "the script did not run in a warm bash"
        return o


@pytest.fixture
def backend(backend_name: str):
    """A fresh backend instance with default options (``warm`` as the variant says)."""
    name = base(backend_name)
    cls, _, why = _probe(name)
    if why:
        pytest.fail(f"CI runs the isolation suite on every backend, but {why}")
    assert cls is not None
    if name not in WARM_BACKENDS:
        yield cls()
        return
    warm = backend_name != name
    # Work dirs under a root of this process's own, as a worker keeps them. Docker's
    # warm variants insist (warm=True): its probe refuses where warm cannot run.
    b = cls(warm=True if warm and name == "docker" else warm,
            workdir_root=str(workdir.owner_root(workdir.default_root())))
    variant = backend_name.removeprefix(name)
    native = False
    if name in NATIVE_BACKENDS and b.warm_pool is not None:
        if variant == "+pyexec":
            b.warm_pool.launcher = ""  # as where no compiler is found
        elif variant == "+exec":
            native = _in_ci() or launcher.build() is not None
    yield MustRunWarm(b, variant in ("+exec", "+pyexec", "+bash"), native,
                      bash=variant == "+bash") if warm else b
    b.close()


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")
