"""nsjail's argv: what its flags mean, as nsjail reads them."""

from __future__ import annotations

import pytest

from sandmill.isolation import Limits, RunSpec

nsjail = pytest.importorskip("sandmill.isolation.nsjail")


@pytest.mark.parametrize("wall_s", [0.2, 1, 1.5, 30])
def test_time_limit_never_fires_before_the_deadline(wall_s: float, tmp_path) -> None:
    """nsjail checks --time_limit in whole seconds of time(2): N kills anywhere in (N-1, N]
    s after the start. It must stay a backstop one second beyond the wall limit, or a job
    is killed early (seen: a 1 s job killed at 0.6 s)."""
    try:
        b = nsjail.NsjailBackend(warm=False)
    except Exception as e:  # noqa: BLE001 - no binary here
        pytest.skip(f"nsjail unavailable: {e}")
    spec = RunSpec(argv=["/bin/true"], limits=Limits(wall_s=wall_s))
    argv = b.build_argv(spec, tmp_path, str(tmp_path / "log"))
    limit = int(argv[argv.index("--time_limit") + 1])
    assert limit - 1 >= wall_s, argv
