"""The autoscaling decision: a pure function of a group's config, its worker count, its
queue and its occupancy, and the time since the last change (Windmill's rules).

In order, the first that applies wins:

1. clamp the count to [min_workers, max_workers];
2. more jobs waiting than ``full_scale_jobs_waiting`` (default max): straight to max,
   ignoring the cooldown (``full_scale_out``);
3. a group at zero with jobs waiting steps out at once, ignoring the cooldown (scale to
   zero must not leave a job waiting out a cooldown);
4. within ``cooldown_seconds`` of the last change: nothing;
5. step out by ``inc_num_workers`` when at least ``inc_scale_num_jobs_waiting`` jobs wait,
   or the 15 s occupancy is above ``inc_scale_occupancy_rate``;
6. step in by ``inc_num_workers`` only with no job waiting, all three occupancy windows
   (15 s, 5 min, 30 min) below ``dec_scale_occupancy_rate`` (no live worker: 0), and, after a full scale-out,
   once ``full_scale_cooldown_seconds`` have passed;
7. else nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from sandmill.profiles.autoscaling import Autoscaling


@dataclass(frozen=True)
class Occupancy:
    """A group's occupancy (0..1) over 15 s, 5 min and 30 min, weighted by subworkers."""

    s15: float
    m5: float
    m30: float


@dataclass(frozen=True)
class Decision:
    """What to do: ``desired`` workers; ``event`` is None when nothing changes."""

    desired: int
    event: str | None  # clamp | full_scale_out | scale_out | scale_in
    reason: str


def decide(cfg: Autoscaling, current: int, waiting: int, occupancy: Occupancy | None,
           since_change_s: float | None, last_event: str | None = None) -> Decision:
    """The count a group should have now. ``current``: its worker count (the last one asked
    for); ``waiting``: jobs due for its tags and not running; ``occupancy``: None when no
    worker of it reports one; ``since_change_s``: seconds since the last change (None:
    never); ``last_event``: the type of that change."""
    lo, hi = cfg.min_workers, cfg.max_workers
    if current < lo:
        return Decision(lo, "clamp", f"{current} worker(s) is below min_workers {lo}")
    if current > hi:
        return Decision(hi, "clamp", f"{current} worker(s) is above max_workers {hi}")
    full = cfg.full_scale_waiting
    if waiting > full and current < hi:
        return Decision(hi, "full_scale_out",
                        f"{waiting} job(s) waiting, more than full_scale_jobs_waiting {full}")
    step = cfg.step
    if current == 0 and waiting > 0:
        return Decision(min(hi, step), "scale_out", f"scaled to zero and {waiting} job(s) waiting")
    if since_change_s is not None and since_change_s < cfg.cooldown_seconds:
        return Decision(current, None, f"in cooldown ({since_change_s:.0f} s of {cfg.cooldown_seconds} s)")
    up = cfg.inc_scale_occupancy_rate / 100
    if current < hi and waiting >= cfg.inc_scale_num_jobs_waiting:
        return Decision(min(hi, current + step), "scale_out",
                        f"{waiting} job(s) waiting (inc_scale_num_jobs_waiting {cfg.inc_scale_num_jobs_waiting})")
    if current < hi and occupancy is not None and occupancy.s15 > up:
        return Decision(min(hi, current + step), "scale_out",
                        f"occupancy {occupancy.s15:.0%} over 15 s is above {cfg.inc_scale_occupancy_rate}%")
    down = cfg.dec_scale_occupancy_rate / 100
    occ = occupancy or Occupancy(0.0, 0.0, 0.0)  # no worker reports: none is busy
    if current > lo and waiting == 0 and max(occ.s15, occ.m5, occ.m30) < down:
        if (last_event == "full_scale_out" and since_change_s is not None
                and since_change_s < cfg.full_scale_cooldown_seconds):
            return Decision(current, None, f"in full-scale cooldown ({since_change_s:.0f} s of"
                                           f" {cfg.full_scale_cooldown_seconds} s)")
        return Decision(max(lo, current - step), "scale_in",
                        f"no job waiting and occupancy {occ.s15:.0%} / {occ.m5:.0%} /"
                        f" {occ.m30:.0%} (15 s / 5 min / 30 min) below {cfg.dec_scale_occupancy_rate}%")
    return Decision(current, None, "steady")
