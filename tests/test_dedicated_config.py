"""The configuration of dedicated workers, checked before anything runs: profiles (YAML and
group configs) and scripts."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sandmill.profiles import ProfileError, profile_from_dict
from sandmill.server.models import ScriptCreate, validate_group_config
from sandmill.worker.dedicated import dedicated_tags

from support import REPO


def test_a_dedicated_group_needs_no_tags_and_serves_every_listed_script():
    p = profile_from_dict({"name": "d", "dedicated_worker": "ws:f/a", "dedicated_workers": ["ws:f/b", "ws:f/a"]})
    assert p.tags == [] and p.dedicated == ["ws:f/a", "ws:f/b"]
    assert dedicated_tags(p) == ["ws:f/a", "ws:f/b"]


@pytest.mark.parametrize("extra, words", [
    ({}, "tags: a group needs at least one tag"),
    ({"dedicated_worker": "ws:f/a", "tags": ["python3"]}, "serves only them; leave tags out"),
    ({"dedicated_worker": "ws:f/a", "backend": {"kind": "docker"}}, "docker cannot host a long-lived runtime"),
    ({"dedicated_worker": "ws:f/a", "backend": {"kind": "process", "warm": False}}, "backend.warm must stay true"),
    ({"dedicated_worker": "ws:f/a", "backend": {"kind": "nsjail", "lo_up": True}}, "lo_up turns warm interpreters off"),
    ({"dedicated_worker": "ws:f/a", "limits": {"cpu_s": 5}}, "limits.cpu_s"),
    ({"dedicated_workers": ["no-workspace"]}, "'<workspace>:<script path>'"),
    ({"dedicated_worker": "ws:bad path"}, "dedicated_worker"),
])
def test_refused_with_the_reason(extra, words):
    with pytest.raises(ProfileError) as e:
        profile_from_dict({"name": "d", **extra}, source="g.yaml")
    assert words in str(e.value) and str(e.value).startswith("g.yaml: field"), str(e.value)


def test_group_configs_are_checked_the_same_way():
    cfg, errs = validate_group_config("d", {"dedicated_workers": ["ws:f/a"]})
    assert not errs and cfg == {"dedicated_workers": ["ws:f/a"]}
    _, errs = validate_group_config("d", {"dedicated_worker": "ws:f/a", "backend": {"kind": "docker"}})
    assert errs and "docker cannot host" in errs[0]["reason"]


@pytest.mark.parametrize("language", ["bash", "postgresql", "http"])
def test_a_script_without_a_cold_start_cannot_be_dedicated(language):
    with pytest.raises(ValueError, match=f"only python3 scripts .* {language} jobs start without one"):
        ScriptCreate(path="f/x", content="x", language=language, dedicated_worker=True)
    assert ScriptCreate(path="f/x", content="def main():\n  pass\n", language="python3", dedicated_worker=True)


def test_profiles_check_accepts_a_dedicated_profile(tmp_path):
    f = tmp_path / "d.yaml"
    f.write_text("name: d\ndedicated_worker: 'ws:f/a'\nbackend: {kind: nsjail}\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\ndedicated_worker: 'ws:f/a'\nbackend: {kind: docker}\n")
    r = subprocess.run([sys.executable, "-m", "sandmill", "profiles", "check", str(f), str(bad)],
                       capture_output=True, text=True, cwd=REPO)
    assert f"{f}: ok" in r.stdout, r.stdout + r.stderr
    assert "docker cannot host a long-lived runtime" in r.stdout + r.stderr and r.returncode == 1
