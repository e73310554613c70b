"""An agent worker: a worker of a group that reaches the server over HTTP(S) only, with an
agent token, and no database connection. Everything else (backends, subworkers, limits,
claim ahead, cancel, init and periodic scripts) is the DB worker's own code: only its store
(``AgentStore``, over HTTP) and its LISTEN (a long poll, ``_keep_listening``) differ."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any

import jwt

from sandmill.profiles import Profile

from .agent_client import AgentClient, AgentRefused, AgentUnreachable, Backoff
from .agent_store import AgentStore, Outbox
from .main import serve
from .settings import WorkerSettings, WorkerStartError
from .worker import Worker

log = logging.getLogger("sandmill.worker")

LISTEN_WAIT_S = float(os.environ.get("SANDMILL_AGENT_LISTEN_S", 25))
# An agent's claim ahead covers an HTTP round trip, not a statement's: with very short
# jobs a slot holds as many as run in 50 ms (up to 32), unless the environment says
# otherwise (SANDMILL_CLAIM_AHEAD_COVER_S, SANDMILL_CLAIM_AHEAD_MAX). docs/performance.md
# Its idle slots look again every 60 s, not 30: the server's long poll wakes them (and,
# after anything it may have missed, says so: resync), so the poll is only a fallback.
AGENT_DEFAULTS = {"claim_ahead_cover_s": ("SANDMILL_CLAIM_AHEAD_COVER_S", 0.05),
                  "claim_ahead_max": ("SANDMILL_CLAIM_AHEAD_MAX", 32),
                  "poll_s": ("SANDMILL_POLL_S", 60.0)}
EXIT_REFUSED = 4  # the server refused this agent's token (revoked, expired) while it ran


def token_claims(token: str) -> dict[str, Any]:
    """The claims of an agent token, read without its signature (the server checks that):
    the worker checks its profile against them before it starts."""
    if not token.startswith("jwt_agent_"):
        raise WorkerStartError("SANDMILL_AGENT_TOKEN is not an agent token (jwt_agent_...:"
                               " sandmill agent-token create)")
    try:
        return jwt.decode(token[len("jwt_agent_"):], options={"verify_signature": False})
    except jwt.InvalidTokenError as e:
        raise WorkerStartError(f"SANDMILL_AGENT_TOKEN cannot be read: {e}") from None


class AgentWorker(Worker):
    """A Worker whose store is the server's agent routes."""

    def __init__(self, profile: Profile, url: str, token: str, *, data_dir: Path,
                 ca_file: str | None = None, settings: WorkerSettings | None = None,
                 name: str | None = None):
        claims = token_claims(token)
        group, tags = claims.get("worker_group"), claims.get("tags") or []
        if group != profile.name or sorted(set(tags)) != sorted(set(profile.tags)):
            raise WorkerStartError(
                f"the agent token is for group {group!r} with tags {tags}, but profile {profile.name!r}"
                f" has tags {list(profile.tags)}: the profile's group and tags must be the token's")
        suffix = "@" + str(claims.get("jti", ""))[:12]
        base = name or f"{profile.name}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:4]}"
        settings = settings or WorkerSettings()
        for attr, (env, value) in AGENT_DEFAULTS.items():
            if env not in os.environ:
                setattr(settings, attr, value)
        # a completion request carries at most 1,000 jobs to hold ahead (server/agent_models.py):
        # past that the server refuses the batch and the agent completes job by job (128 x 8
        # slots ran at 2% of the DB worker); half of it leaves room for the completions
        cap = max(1, 1000 // (2 * max(1, profile.subworkers)))
        if settings.claim_ahead_max > cap:
            log.info("claim_ahead_max %d lowered to %d: %d slots' held jobs must fit a completion request",
                     settings.claim_ahead_max, cap, profile.subworkers)
            settings.claim_ahead_max = cap
        super().__init__(profile, "", name=base + suffix, settings=settings)
        # a completion goes out as soon as it is made, while the slots run their held jobs:
        # else all 8 slots ran theirs first and each round trip (the whole batch's) followed
        # them, one in flight (docs/performance.md, "Agent workers"); 0 turns it off
        self.feed.send_first = os.environ.get("SANDMILL_AGENT_SEND_FIRST", "1") != "0"
        self.token_tags = list(tags)
        self.client = AgentClient(url, token, ca_file=ca_file)
        self.q = self.w = self.store = AgentStore(self.client, self.name,
                                                  Outbox(Path(data_dir) / "agent-outbox", self.name))
        self.cursor: list[int] | None = None
        self.refused: str | None = None  # why the server stopped taking this agent

    async def start(self) -> None:
        try:
            await super().start()
        except AgentRefused as e:  # the token, or the profile against it (group, tags)
            raise WorkerStartError(f"the server refused this agent: {e.message}") from None

    async def close(self) -> None:
        try:
            await super().close()
        except (AgentUnreachable, AgentRefused) as e:  # its row goes with the ping timeout
            log.warning("agent %s could not unregister: %s", self.name, e)

    async def _open_store(self) -> None:
        """No connection to open: the server's routes are the store. Read the group's
        config, and send what a dead agent of this data dir left."""
        self.pool = self.hot.pool = self.client
        try:
            await self._apply_config(await self.w.get_config(self.pool, f"worker__{self.profile.name}"))
        except AgentRefused as e:
            raise WorkerStartError(f"the server refused this agent: {e.message}") from None
        except AgentUnreachable as e:
            raise WorkerStartError(str(e)) from None
        if (n := await self.store.send_leftovers()):
            log.info("sent %d result(s) a previous agent process left", n)

    async def _apply_config(self, config: dict[str, Any] | None) -> bool:
        applied = await super()._apply_config(config)
        self.tags = self.token_tags  # the token's: the server claims for these whatever we say
        return applied

    async def _listen(self) -> None:
        """The first long poll's cursor: from then on, what happens is what comes after."""
        r = await self.client.post("listen", {"name": self.name, "cursor": None, "wait_s": 0})
        self.cursor = r["cursor"]

    async def _keep_listening(self) -> None:
        """The LISTEN of a DB worker, as a long poll: wake the idle slots when a job of our
        tags comes, kill canceled jobs, reload the group's config. A server that cannot be
        reached is asked again with backoff; then, as after a DB worker's lost LISTEN, every
        idle slot wakes and the config is read again."""
        backoff, lost, last_resync = Backoff(max_s=2.0), False, 0.0
        while True:
            try:
                r = await self.client.post("listen", {"name": self.name, "cursor": self.cursor,
                                                      "wait_s": LISTEN_WAIT_S, "stats": self.store.take_stats()},
                                           timeout=LISTEN_WAIT_S + 15, retry_s=0)
            except AgentRefused as e:
                if e.status in (401, 403):
                    self.refused = e.message
                    log.error("the server refused this agent (%s): stopping", e.message)
                    self.stop()
                    return
                log.warning("listen refused (%s); retrying", e)
                await backoff.wait()
                continue
            except AgentUnreachable as e:
                if not lost:
                    log.warning("server unreachable (%s); trying again", e)
                lost = True
                await backoff.wait()
                continue
            except Exception as e:  # noqa: BLE001 - a bad answer: the loop goes on
                log.warning("listen failed (%s: %s); retrying", type(e).__name__, e)
                await backoff.wait()
                continue
            backoff = Backoff(max_s=2.0)
            self.cursor = r["cursor"]
            if r["resync"] and time.monotonic() - last_resync < 1.0:
                # two servers taking turns (a balancer that is not sticky): each cursor is
                # the other's news; look at most once a second rather than in a loop
                await asyncio.sleep(1.0)
            if r["resync"]:
                last_resync = time.monotonic()
            if lost:
                lost = False
                log.info("server reachable again; listening")
            if r["wake"] or r["resync"]:
                self.slots.wake_all()
                self.feed.completer.flush_if(lambda d: d.now)
            for job_id in r["cancels"]:
                self._on_cancel(None, 0, "", job_id)
            if r["config"]:
                self._spawn(self._reload_config())


def run_agent(profile: Profile, url: str, token: str, *, data_dir: Path, ca_file: str | None = None,
              settings: WorkerSettings | None = None) -> int:
    """Entry point of `sandmill worker --agent`: run until SIGTERM/SIGINT. Returns the exit
    code: 0; 2 when it cannot start (a token not for this profile, the server refusing or
    unreachable); 3 when the init script failed; 4 when the server refused the token
    while it ran (revoked, expired)."""

    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    return serve(lambda: AgentWorker(profile, url, token, data_dir=data_dir, ca_file=ca_file, settings=settings),
                 f"agent worker {profile.name}", lambda w: EXIT_REFUSED if w.refused else 0)
