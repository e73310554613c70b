"""The autoscaling decision (server/autoscale/rules.py), the autoscaling config's checks
and the worker's occupancy windows (worker/occupancy.py): pure functions, no database."""

from __future__ import annotations

import pytest

from sandmill.profiles import ProfileError, profile_from_dict
from sandmill.profiles.autoscaling import Autoscaling
from sandmill.server.autoscale.rules import Occupancy, decide
from sandmill.worker.occupancy import Occupancy as WorkerOccupancy

IDLE = Occupancy(0.0, 0.0, 0.0)
BUSY = Occupancy(0.9, 0.9, 0.9)


def cfg(**kw) -> Autoscaling:
    return Autoscaling(**{"enabled": True, "min_workers": 0, "max_workers": 10, "cooldown_seconds": 60,
                          "full_scale_cooldown_seconds": 600, **kw})


def test_windmill_defaults():
    a = Autoscaling(enabled=True, min_workers=2, max_workers=12)
    assert (a.cooldown_seconds, a.dec_scale_occupancy_rate, a.inc_scale_occupancy_rate,
            a.inc_scale_num_jobs_waiting) == (300, 25, 75, 1)
    assert a.full_scale_waiting == 12  # default: max_workers
    assert a.step == 2  # (max - min) / 5
    assert Autoscaling(enabled=True, min_workers=0, max_workers=4).step == 1  # at least one
    assert a.integration.type == "local"


@pytest.mark.parametrize("bad, field, words", [
    ({"min_workers": 5, "max_workers": 4}, "autoscaling", "min_workers (5) is more than max_workers (4)"),
    ({"enabled": True, "min_workers": 0, "max_workers": 0}, "autoscaling", "max_workers must be at least 1"),
    ({"dec_scale_occupancy_rate": 80}, "autoscaling", "must be below inc_scale_occupancy_rate"),
    ({"min_workers": -1}, "autoscaling.min_workers", "greater than or equal to 0"),
    ({"inc_scale_occupancy_rate": 120}, "autoscaling.inc_scale_occupancy_rate", "less than or equal to 100"),
    ({"integration": {"type": "script"}}, "autoscaling.integration.script.path", "Field required"),
    ({"integration": {"type": "nomad"}}, "autoscaling.integration", "does not match any of the expected tags"),
    ({"cooldown": 5}, "autoscaling.cooldown", "Extra inputs are not permitted"),
    ({"custom_tags": ["a b"]}, "autoscaling", "bad tag 'a b'"),
])
def test_nonsense_is_refused_naming_the_field(bad, field, words):
    with pytest.raises(ProfileError) as e:
        profile_from_dict({"name": "g", "tags": ["t"], "autoscaling": bad}, source="g.yaml")
    assert f"g.yaml: field '{field}'" in str(e.value) and words in str(e.value)


def test_clamps_to_min_and_max():
    d = decide(cfg(min_workers=2), 0, 0, None, None)
    assert (d.desired, d.event) == (2, "clamp")
    d = decide(cfg(max_workers=3), 5, 100, BUSY, 1.0)
    assert (d.desired, d.event) == (3, "clamp")


def test_large_backlog_goes_straight_to_max_ignoring_the_cooldown():
    d = decide(cfg(max_workers=8), 2, 9, IDLE, since_change_s=1.0)
    assert (d.desired, d.event) == (8, "full_scale_out")
    assert "9 job(s) waiting, more than full_scale_jobs_waiting 8" in d.reason
    # at the threshold, not more: an incremental step (cooldown over)
    d = decide(cfg(max_workers=8), 2, 8, IDLE, since_change_s=100.0)
    assert (d.desired, d.event) == (3, "scale_out")
    assert decide(cfg(max_workers=8, full_scale_jobs_waiting=3), 2, 4, IDLE, 1.0).desired == 8


def test_cooldown_holds_incremental_steps():
    c = cfg(max_workers=10, inc_num_workers=2)
    d = decide(c, 2, 3, BUSY, since_change_s=30.0)
    assert (d.desired, d.event) == (2, None) and "cooldown" in d.reason
    d = decide(c, 2, 3, BUSY, since_change_s=61.0)
    assert (d.desired, d.event) == (4, "scale_out")
    d = decide(c, 4, 0, IDLE, since_change_s=30.0)
    assert d.event is None and "cooldown" in d.reason
    assert decide(c, 4, 0, IDLE, since_change_s=61.0).desired == 2


def test_a_group_at_zero_wakes_at_once():
    d = decide(cfg(max_workers=4), 0, 1, None, since_change_s=0.5)
    assert (d.desired, d.event) == (1, "scale_out") and "scaled to zero" in d.reason


def test_steps_out_on_queue_depth_or_occupancy():
    c = cfg(max_workers=10, inc_scale_num_jobs_waiting=3)
    assert decide(c, 2, 2, IDLE, None).event is None  # too few waiting, idle
    assert decide(c, 2, 3, IDLE, None).desired == 4
    d = decide(c, 2, 0, Occupancy(0.8, 0.1, 0.1), None)
    assert (d.desired, d.event) == (4, "scale_out") and "above 75%" in d.reason
    assert decide(c, 10, 5, BUSY, None).event is None  # at max


def test_steps_in_only_with_an_empty_queue_and_all_windows_low():
    c = cfg(min_workers=1, max_workers=10)
    assert decide(c, 5, 1, IDLE, None).event is None or decide(c, 5, 1, IDLE, None).event == "scale_out"
    assert decide(c, 5, 0, Occupancy(0.1, 0.1, 0.3), None).event is None  # 30 min still busy
    assert decide(c, 5, 0, Occupancy(0.3, 0.1, 0.1), None).event is None  # 15 s busy
    d = decide(c, 5, 0, Occupancy(0.1, 0.2, 0.24), None)
    assert (d.desired, d.event) == (4, "scale_in")
    assert decide(c, 1, 0, IDLE, None).event is None  # at min
    assert decide(cfg(), 1, 0, None, None).desired == 0  # no live worker reports: none is busy


def test_no_scale_in_during_the_full_scale_cooldown():
    c = cfg(min_workers=0, max_workers=4, cooldown_seconds=10, full_scale_cooldown_seconds=100)
    d = decide(c, 4, 0, IDLE, since_change_s=50.0, last_event="full_scale_out")
    assert d.event is None and "full-scale cooldown" in d.reason
    assert decide(c, 4, 0, IDLE, since_change_s=101.0, last_event="full_scale_out").desired == 3
    assert decide(c, 4, 0, IDLE, since_change_s=50.0, last_event="scale_out").desired == 3


def test_worker_occupancy_windows():
    t = [0.0]
    occ = WorkerOccupancy(subworkers=2, clock=lambda: t[0])
    t[0] = 10.0  # one slot busy all along: half the capacity
    assert occ.sample([0.0]) == pytest.approx((0.5, 0.5, 0.5))
    t[0] = 20.0
    occ.add_completed(20.0)  # that job ended at 20 s
    assert occ.sample([]) == pytest.approx((0.5, 0.5, 0.5))
    for k in range(1, 21):  # then idle for 300 s, pinged every 15 s
        t[0] = 20.0 + 15 * k
        s15, m5, m30 = occ.sample([])
    assert s15 == 0.0 and m5 == pytest.approx(0.0) and m30 == pytest.approx(20.0 / (320 * 2))
    # both slots busy for the last 15 s
    t[0] += 15
    occ.sample([t[0] - 15, t[0] - 15])
    s15, m5, m30 = occ.sample([t[0] - 15, t[0] - 15])
    assert s15 == pytest.approx(1.0) and m5 == pytest.approx(30.0 / 600)
    for k in range(200):  # 30 min later the oldest samples are gone
        t[0] += 15
        occ.sample([])
    assert len(occ._t) <= 1800 / 15 + 2


def test_worker_occupancy_interpolates_between_pings():
    t = [0.0]
    occ = WorkerOccupancy(subworkers=1, clock=lambda: t[0])
    t[0] = 100.0
    occ.add_completed(100.0)
    occ.sample([])
    t[0] = 110.0  # 10 s idle since the last sample: the 15 s window reaches 5 s back into busy time
    assert occ.sample([])[0] == pytest.approx(5.0 / 15.0)


def test_profiles_from_env_takes_files_folders_and_shipped_names(tmp_path):
    import os

    from sandmill.server.autoscale.groups import profiles_from_env
    d = tmp_path / "mounted"
    d.mkdir()
    (d / "a.yaml").write_text("name: a\ntags: [ta]\nautoscaling: {enabled: true, min_workers: 0, max_workers: 2}\n")
    (d / "b.yaml").write_text("name: b\ntags: [tb]\n")
    one = tmp_path / "c.yaml"
    one.write_text("name: c\ntags: [tc]\n")
    got = profiles_from_env(os.pathsep.join([str(d), str(one), "native"]))
    assert [p.name for p in got] == ["a", "b", "c", "native"]
    assert got[0].autoscaling.enabled and got[1].autoscaling is None
    with pytest.raises(ProfileError, match="no such file"):
        profiles_from_env(str(tmp_path / "missing.yaml"))
