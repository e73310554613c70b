"""Python dependencies on the warm path, end to end (isolation/zygote.py, "Mount roots"):
on nsjail, a job whose script has a requirement forks from a warm interpreter with its
environment bound read-only, and sees no other environment of the host's cache."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import pytest

from support import SLOWDOWN, wait_done

PROFILE = """
name: {name}
tags: [{tag}]
backend: {{kind: nsjail}}
subworkers: 1
"""

# imports six from its environment; lists what it sees of the cache's envs dir
CODE = ("# requirements:\n# six\n\nimport os\nimport six\n\n\ndef main():\n"
        "    env = os.path.dirname(six.__file__)\n"
        "    return {'six': six.__version__, 'envs': sorted(os.listdir(os.path.dirname(env)))}\n")


@pytest.fixture()
def pydeps_dir():
    d = Path("/var/cache/sandmill/test-pydeps") / uuid.uuid4().hex[:10]
    d.mkdir(parents=True)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_an_nsjail_job_with_a_requirement_runs_warm(make_cluster, pydeps_dir, ws):
    c = make_cluster(env={"SANDMILL_PYDEPS_DIR": str(pydeps_dir)})
    tag = f"deps-{uuid.uuid4().hex[:6]}"
    c.start_worker(profile_text=PROFILE.format(name=tag, tag=tag))
    c.wait_workers(tag, count=1)
    # another environment already in the cache: no job of this script may see it
    other = pydeps_dir / "envs" / "cp311-x86_64-someone-elses"
    other.mkdir(parents=True)
    (other / "secret.py").write_text("X = 1\n")
    with c.client() as api:
        r = api.post(f"/api/w/{ws}/scripts/create",
                     json={"path": "f/deps/warm", "content": CODE, "language": "python3", "tag": tag})
        assert r.status_code == 201, r.text
        h = r.text
        lock_job = api.get(f"/api/w/{ws}/scripts/get/h/{h}").json()["lock_job"]
        dep = wait_done(api, ws, lock_job, timeout=120 * SLOWDOWN)
        assert dep["success"], dep
        jobs = [wait_done(api, ws, api.post(f"/api/w/{ws}/jobs/run/h/{h}", json={}).text,
                          timeout=60 * SLOWDOWN) for _ in range(3)]
    for j in jobs:
        assert j["success"], j
        assert j["outcome"]["warm"] is True, j["outcome"]
        assert j["result"]["envs"] == [dep["result"]["environment"]], j["result"]
