"""Job log streaming: whole lines from stdout and stderr, in arrival order, flushed to the
database in batches (one INSERT per flush, not per line)."""

from __future__ import annotations

import asyncio
import uuid

from sandmill.store import queue

FLUSH_EVERY_S = 0.25
FLUSH_BYTES = 64 * 1024
MAX_LOG_BYTES = 2 * 1024 * 1024  # stored per job; the rest is summarised in one line


class LogSink:
    """Collects output chunks (the backend's on_output callback) and writes them out."""

    def __init__(self, db, job_id: uuid.UUID):
        self.db, self.job_id = db, job_id
        self._partial = {"stdout": "", "stderr": ""}
        self._pending: list[str] = []
        self._pending_bytes = 0
        self._stored = 0
        self._dropped = 0
        self._wake: asyncio.Event | None = None  # with the flusher: most jobs print nothing
        self._task: asyncio.Task | None = None

    def on_output(self, stream: str, chunk: bytes) -> None:
        text = self._partial[stream] + chunk.decode(errors="replace")
        head, sep, rest = text.rpartition("\n")
        self._partial[stream] = rest
        if sep:
            self._add(head + "\n")
        if len(rest) > 8192:  # an endless line: emit it in pieces
            self._add(rest)
            self._partial[stream] = ""

    def note(self, text: str) -> None:
        """A line from sandmill itself (not the job)."""
        self._add(f"[sandmill] {text}\n")

    def _add(self, text: str) -> None:
        if self._stored + len(text) > MAX_LOG_BYTES:
            self._dropped += len(text)
            return
        self._stored += len(text)
        self._pending.append(text)
        self._pending_bytes += len(text)
        if self._task is None:  # the flusher starts with the first line: most jobs print none
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run(self._wake))
        if self._pending_bytes >= FLUSH_BYTES:
            self._wake.set()

    async def _run(self, wake: asyncio.Event) -> None:
        while True:
            try:
                await asyncio.wait_for(wake.wait(), FLUSH_EVERY_S)
            except asyncio.TimeoutError:
                pass
            wake.clear()
            await self.flush()

    async def flush(self) -> None:
        if self._pending:
            chunks, self._pending, self._pending_bytes = self._pending, [], 0
            await queue.append_logs(self.db, self.job_id, chunks)

    async def close(self) -> None:
        """Stop the flusher and write whatever is left, partial lines included."""
        if self._task is None and not (self._pending or self._dropped or any(self._partial.values())):
            return  # nothing was logged (a native job's usual case): nothing to do
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        for stream in ("stdout", "stderr"):
            if self._partial[stream]:
                self._add(self._partial[stream] + "\n")
                self._partial[stream] = ""
        if self._dropped:
            self._pending.append(f"[sandmill] {self._dropped} more bytes of log not stored\n")
        await self.flush()
