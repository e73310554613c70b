"""An agent's outbox through a long outage: the feed sends the same completion batch again
and again while the server is away; each try reuses the batch's file (one per try would
pile up, and be sent again by the next agent process on the data dir)."""

from __future__ import annotations

import asyncio
import socket
import uuid

import pytest

from sandmill.store.claims import Completion
from sandmill.worker.agent_client import AgentClient, AgentUnreachable
from sandmill.worker.agent_store import AgentStore, Outbox


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_retries_of_a_batch_keep_one_outbox_file(tmp_path):
    async def go() -> list:
        client = AgentClient(f"http://127.0.0.1:{_closed_port()}", "jwt_agent_x", retry_s=0.2)
        store = AgentStore(client, "w@abc", Outbox(tmp_path, "w@abc"))
        done = [Completion(uuid.uuid4(), "w@abc", "success", i, None) for i in range(3)]
        try:
            for _ in range(3):  # the feed's retries of the same batch
                with pytest.raises(AgentUnreachable):
                    await store.complete_and_pull(client, list(done), "w@abc", [], 1)
            files = sorted(tmp_path.rglob("*.json"))
            with pytest.raises(AgentUnreachable):  # another batch: a file of its own
                await store.complete_and_pull(client, done[:1], "w@abc", [], 1)
            return [files, sorted(tmp_path.rglob("*.json"))]
        finally:
            await client.close()

    one, two = asyncio.run(go())
    assert len(one) == 1 and len(two) == 2, (one, two)
