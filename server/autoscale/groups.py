"""The groups the autoscaler acts on: the profiles a server was given
(``SANDMILL_PROFILES``, published to the database so whichever server leads knows them),
with each group's stored config (``worker__<group>``) laid over its profile."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sandmill.profiles import Profile, ProfileError, load_profile, profile_from_dict, resolve
from sandmill.profiles.autoscaling import Autoscaling
from sandmill.store import autoscale as store

log = logging.getLogger("sandmill.autoscale")


@dataclass
class Group:
    """An autoscaled group as the autoscaler sees it on one check."""

    name: str
    profile: Profile
    cfg: Autoscaling
    tags: list[str]             # whose waiting jobs count: custom_tags, else the group's tags
    desired: int | None         # the count last asked for (None: never)
    since_change_s: float | None
    last_event: str | None


def profiles_from_env(value: str | None = None) -> list[Profile]:
    """The profiles named by ``SANDMILL_PROFILES``: files, folders (their ``*.yaml``, as a
    mounted ConfigMap) or shipped names, separated by ``os.pathsep``. A bad one raises
    ProfileError (file, field and reason)."""
    value = os.environ.get("SANDMILL_PROFILES", "") if value is None else value
    paths: list[Path] = []
    for ref in (r.strip() for r in value.split(os.pathsep)):
        if ref:
            p = resolve(ref)
            paths += sorted(p.glob("*.yaml")) if p.is_dir() else [p]
    return [load_profile(p) for p in paths]


async def publish(db: Any, profiles: list[Profile]) -> None:
    """Publish the profiles, autoscaled or not (a group's stored config may turn it on)."""
    for p in profiles:
        a = p.autoscaling
        await store.publish_group(db, p.name, p.model_dump(mode="json"), bool(a and a.enabled),
                                  (a.custom_tags if a else None) or p.tags)


def effective(row: dict[str, Any]) -> Group | None:
    """The group of one ``store.groups`` row with its config laid over its profile; None
    when autoscaling is off or the result is not a valid profile (logged)."""
    name = row["worker_group"]
    raw = {**(row["profile"] or {}), **(row["config"] or {}), "name": name}
    try:
        prof = profile_from_dict(raw, source=f"group {name} (profile + config worker__{name})")
    except ProfileError as e:
        log.warning("autoscaling skips group %s: %s", name, e)
        return None
    a = prof.autoscaling
    if a is None or not a.enabled:
        return None
    return Group(name, prof, a, list(a.custom_tags or prof.tags), row["desired"],
                 row["since_change_s"], row["last_event_type"])


async def load_groups(db: Any) -> list[Group]:
    """Every group with autoscaling enabled, as configured now."""
    return [g for g in (effective(r) for r in await store.groups(db)) if g is not None]
