"""What applies a decision: ``local`` (the `sandmill up` supervisor follows the count
recorded in the database), ``dryrun`` (recorded only), ``script`` (a command run with
group, desired count, reason and event type) and ``kubernetes`` (server/autoscale/kube.py).
Each returns (status, output) for the event; only a status other than ``failed...`` or
``exit <non-zero>`` lets the count be recorded."""

from __future__ import annotations

import asyncio
import os
import signal
from dataclasses import dataclass
from typing import Any

from .groups import Group
from .rules import Decision

OUTPUT_LIMIT = 64 * 1024  # bytes of a script's output kept in the event


@dataclass
class Applied:
    """An integration's answer: its status (requested, recorded, applied, exit <n>, timed
    out, failed: ...) and output."""

    status: str
    output: str = ""

    @property
    def ok(self) -> bool:
        """Did it apply (so the count asked for is recorded)?"""
        return self.status in ("requested", "recorded", "applied", "exit 0")


def clean_text(data: bytes) -> str:
    """Bytes a script printed, as text PostgreSQL stores: invalid UTF-8 as U+FFFD, NUL as
    U+2400, cut at OUTPUT_LIMIT."""
    cut = len(data) > OUTPUT_LIMIT
    text = data[:OUTPUT_LIMIT].decode("utf-8", "replace").replace("\x00", "\u2400")
    text = "".join(c if not 0xD800 <= ord(c) <= 0xDFFF else "\ufffd" for c in text)
    return text + ("\n[output cut at 64 KiB]" if cut else "")


async def run_script(path: str, group: Group, d: Decision, timeout_s: float) -> Applied:
    """Run ``path group desired reason event_type``; its exit status and output (stdout
    and stderr together) are the event's."""
    try:
        proc = await asyncio.create_subprocess_exec(
            path, group.name, str(d.desired), d.reason, d.event or "", stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, start_new_session=True)
    except OSError as e:
        return Applied(f"failed: cannot run {path}: {e.strerror or e}")
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout_s)
    except asyncio.TimeoutError:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the script and whatever it started
        except ProcessLookupError:
            pass
        out, _ = await proc.communicate()
        return Applied("timed out", clean_text(out or b"") + f"\n[killed after {timeout_s:g} s]")
    return Applied(f"exit {proc.returncode}", clean_text(out))


async def apply(group: Group, d: Decision, current: int, pool: Any) -> Applied:
    """Apply ``d`` through the group's integration."""
    integ = group.cfg.integration
    try:
        if integ.type == "local":
            return Applied("requested")  # the supervisor reads the recorded count
        if integ.type == "dryrun":
            return Applied("recorded")
        if integ.type == "script":
            return await run_script(integ.path, group, d, integ.timeout_s)
        if integ.type == "kubernetes":
            from .kube import scale  # the kubernetes client loads only where it is used
            return Applied("applied", await scale(integ, group.name, d.desired, current, pool))
    except Exception as e:  # noqa: BLE001 - a failed integration is an event, not a dead loop
        return Applied(f"failed: {type(e).__name__}: {e}"[:2000])
    return Applied(f"failed: unknown integration {integ.type!r}")
