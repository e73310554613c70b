"""A runtime script marked ``# sandmill: prepare-once`` (isolation/zygote.py ``_prepare``):
its module body runs once in the warm interpreter, each job calls its
``__sandmill_job__()`` in a fork of that module; a script without the mark runs whole
in each job, as before."""

from __future__ import annotations

import pytest

from sandmill.isolation import Limits, RunSpec, workdir
from sandmill.isolation.nsjail import NsjailBackend
from sandmill.isolation.process import ProcessBackend

pytestmark = pytest.mark.timeout(60)

BODY = b"""import os, sys
MADE_FOR = os.environ.get("T")  # None in the warm interpreter (prepared); the job's T otherwise
def __sandmill_job__():
    print("job", MADE_FOR, os.environ["T"], __name__, sys.modules["__main__"].__dict__ is globals(), sys.argv[1:])
if __name__ != "__sandmill_warm__":
    print("whole", MADE_FOR, __name__, sys.argv[1:])
"""
MARKED = b"import os\n# sandmill: prepare-once\n" + BODY


def _spec(runtime: bytes) -> RunSpec:
    return RunSpec(argv=["/usr/bin/python3", "-u", "run.py", "a1"], env={"PATH": "/usr/bin:/bin", "T": "t1"},
                   files={"run.py": runtime}, limits=Limits(wall_s=10), warm="run.py")


@pytest.mark.parametrize("cls", [ProcessBackend, NsjailBackend])
async def test_a_marked_runtime_is_prepared_once_and_an_unmarked_one_runs_whole(cls: type) -> None:
    b = cls(warm=True, workdir_root=str(workdir.owner_root(workdir.default_root())))
    if not b.probe().available or b.warm_pool is None:
        pytest.skip("no warm pool for this backend here")
    try:
        for _ in range(2):  # every job of the zygote: the same prepared start
            o = await b.run(_spec(MARKED))
            assert o.warm and o.stdout == b"job None t1 __main__ True ['a1']\n", o
        o = await b.run(_spec(BODY))
        assert o.warm and o.stdout == b"whole t1 __main__ ['a1']\n", o
    finally:
        b.close()
