"""A profile's backend options are exactly what its backend's constructor accepts
(isolation/options.py), checked before anything starts; and which backend a worker runs
its jobs with: an explicit kind or nothing, ``auto`` chooses and says why
(worker/backend_choice.py)."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys

import pytest

from support import REPO
from sandmill.isolation.options import OPTIONS, SHARED_NSJAIL_PROCESS
from sandmill.isolation.registry import BACKENDS, backend_class
from sandmill.profiles import ProfileError, profile_from_dict
from sandmill.worker.backend_choice import resolve_backend
from sandmill.worker.settings import WorkerStartError


def _profile(backend: dict):
    return profile_from_dict({"name": "g", "tags": ["t"], "backend": backend}, source="g.yaml")


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_options_model_matches_the_constructor(name):
    """Each backend's options model has exactly its constructor's keyword arguments, with
    the same defaults: neither can change without the other."""
    params = {n: p for n, p in inspect.signature(backend_class(name).__init__).parameters.items()
              if n != "self"}
    fields = OPTIONS[name].model_fields
    assert set(fields) == set(params), f"{name}: model {sorted(fields)} != constructor {sorted(params)}"
    for n, p in params.items():
        default = p.default if not isinstance(p.default, list) else tuple(p.default)
        assert fields[n].default == default, f"{name}.{n}: model default {fields[n].default!r} != {default!r}"
    # what the model gives builds the backend
    backend_class(name)(**OPTIONS[name]().kwargs()).close()


def test_misspelled_option_is_refused_with_field_and_the_known_options():
    with pytest.raises(ProfileError) as e:
        _profile({"kind": "nsjail", "warmm": False})
    msg = str(e.value)
    assert "g.yaml: field 'backend.nsjail.warmm': Extra inputs are not permitted" in msg, msg
    assert "backend nsjail takes:" in msg and "warm_preload" in msg, msg
    # an option of another backend is as wrong: docker's image is not nsjail's
    with pytest.raises(ProfileError, match=r"field 'backend.nsjail.image'"):
        _profile({"kind": "nsjail", "image": "x"})
    # and a bad value names its field
    with pytest.raises(ProfileError, match=r"field 'backend.docker.api_timeout_s'"):
        _profile({"kind": "docker", "api_timeout_s": "soon"})
    with pytest.raises(ProfileError, match=r"field 'backend.process.workdir_root': .*absolute"):
        _profile({"kind": "process", "workdir_root": "relative/dir"})
    with pytest.raises(ProfileError, match=r"field 'backend': .*'nsjial'.*expected tags"):
        _profile({"kind": "nsjial"})


def test_fallback_is_gone_with_a_message_that_says_why():
    with pytest.raises(ProfileError) as e:
        _profile({"kind": "docker", "fallback": "process"})
    assert "field 'backend'" in str(e.value) and "never falls back" in str(e.value), e.value
    assert "kind: auto" in str(e.value)


def test_kind_defaults_to_auto_which_takes_nsjail_options():
    p = _profile({"warm": False, "lo_up": True})
    assert p.backend.kind == "auto" and p.backend.options["warm"] is False
    # process gets what the two share, not nsjail's own binary and lo_up
    assert set(p.backend.process_options()) == set(SHARED_NSJAIL_PROCESS)
    assert "lo_up" not in SHARED_NSJAIL_PROCESS and "binary" not in SHARED_NSJAIL_PROCESS
    assert p.backend.process_options()["warm"] is False
    # a profile dumped and read back (the worker's DB config overlay) is the same profile
    assert profile_from_dict(p.model_dump()).backend == p.backend


def test_explicit_kind_that_cannot_run_raises_with_the_probe_reason():
    p = _profile({"kind": "docker", "docker_url": "unix:///nonexistent/docker.sock"})
    with pytest.raises(WorkerStartError) as e:
        resolve_backend(p)
    assert "backend docker is not available here" in str(e.value), e.value
    assert "never falls back" in str(e.value)


def test_explicit_kind_says_it_was_named():
    b, why = resolve_backend(_profile({"kind": "process", "warm": False}))
    try:
        assert b.name == "process" and b.warm_pool is None  # the option reached the backend
        assert why.startswith("kind: process (named by the profile)"), why
    finally:
        b.close()


AUTO_AS_NOBODY = """
import json, os
os.setgid(65534); os.setuid(65534)  # not root: nsjail's probe says no
from sandmill.profiles import profile_from_dict
from sandmill.worker.backend_choice import resolve_backend
p = profile_from_dict({"name": "g", "tags": ["t"], "backend": {"kind": "auto", "lo_up": True,
                       "cgroup_parent": "elsewhere"}})
b, why = resolve_backend(p)
print(json.dumps({"name": b.name, "why": why, "cgroup_parent": b.cgroup_parent}))
"""


@pytest.mark.skipif(os.geteuid() != 0,
                    reason="needs root to drop to an unprivileged uid")
def test_auto_chooses_process_where_nsjail_cannot_run_and_says_why():
    r = subprocess.run([sys.executable, "-c", AUTO_AS_NOBODY], capture_output=True, text=True,
                       timeout=60, cwd="/")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["name"] == "process", got
    assert got["why"].startswith("kind: auto chose process: backend nsjail is not available here: needs root"), got
    assert got["cgroup_parent"] == "elsewhere"  # the shared options went to process
    assert "kind: auto chose process" in r.stderr  # and the worker's log warns


def test_shipped_profiles_are_valid():
    r = subprocess.run([sys.executable, "-m", "sandmill", "profiles", "check"], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
