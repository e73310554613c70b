"""Job log streaming: whole lines from stdout and stderr, in arrival order, flushed to the
database in batches (one INSERT per flush, not per line)."""

from __future__ import annotations

import asyncio
import codecs
import logging
import uuid


from sandmill.store import queue

from sandmill.store.storable import storable_text

log = logging.getLogger("sandmill.worker")
_utf8 = codecs.getincrementaldecoder("utf-8")

FLUSH_EVERY_S = 0.25
FLUSH_BYTES = 64 * 1024
MAX_LOG_BYTES = 2 * 1024 * 1024  # stored per job; the rest is summarised in one line
MAX_PARTIAL = 8192  # characters of a line without its end kept before it goes out in pieces


class LogSink:
    """Collects output chunks (the backend's on_output callback) and writes them out.

    What a job prints is hostile: it is decoded per stream with an incremental UTF-8
    decoder (a character split across chunks stays whole), undecodable bytes become U+FFFD
    and NUL becomes U+2400 "␀" (PostgreSQL's text cannot hold NUL; store/storable.py).
    At most MAX_LOG_BYTES (UTF-8) are kept; past that, chunks are only counted, not decoded,
    so a 100 MB line costs bounded memory and time."""

    def __init__(self, db, job_id: uuid.UUID, store=queue):
        self.db, self.job_id = db, job_id
        self.store = store  # sandmill.store.queue, or an agent's (HTTP) store
        self._partial = {"stdout": "", "stderr": ""}
        self._decoders: dict[str, codecs.IncrementalDecoder] = {}
        self._pending: list[str] = []
        self._pending_bytes = 0
        self._stored = 0
        self._dropped = 0
        self._wake: asyncio.Event | None = None  # with the flusher: most jobs print nothing
        self._task: asyncio.Task | None = None
        self._closing = False

    def on_output(self, stream: str, chunk: bytes) -> None:
        if self._stored >= MAX_LOG_BYTES:  # full: count what is not stored, decode nothing
            self._dropped += len(chunk)
            return
        dec = self._decoders.get(stream)
        if dec is None:
            dec = self._decoders[stream] = _utf8("replace")
        text = self._partial[stream] + storable_text(dec.decode(chunk))
        head, sep, rest = text.rpartition("\n")
        self._partial[stream] = rest
        if sep:
            self._add(head + "\n")
        if len(rest) > MAX_PARTIAL:  # an endless line: emit it in pieces
            self._add(rest)
            self._partial[stream] = ""

    def note(self, text: str) -> None:
        """A line from sandmill itself (not the job): kept even past the cap."""
        self._add(f"[sandmill] {storable_text(text)}\n", capped=False)

    def _add(self, text: str, capped: bool = True) -> None:
        size = len(text.encode())
        if capped and self._stored + size > MAX_LOG_BYTES:
            room = max(0, MAX_LOG_BYTES - self._stored)
            kept = text.encode()[:room].decode(errors="ignore")  # whole characters only
            self._dropped += size - len(kept.encode())
            self._stored = MAX_LOG_BYTES  # full from now on
            if not kept:
                return
            text, size = kept, len(kept.encode())
        else:
            self._stored += size
        self._pending.append(text)
        self._pending_bytes += size
        if self._task is None:  # the flusher starts with the first line: most jobs print none
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run(self._wake))
        if self._pending_bytes >= FLUSH_BYTES:
            self._wake.set()

    async def _run(self, wake: asyncio.Event) -> None:
        while not self._closing:
            try:
                await asyncio.wait_for(wake.wait(), FLUSH_EVERY_S)
            except asyncio.TimeoutError:
                pass
            wake.clear()
            await self.flush()

    async def flush(self) -> None:
        """Write what is pending. A failed write is logged and its text dropped: logs are
        kept on a best effort basis, the job's completion must not depend on them."""
        if self._pending:
            chunks, self._pending, self._pending_bytes = self._pending, [], 0
            try:
                await self.store.append_logs(self.db, self.job_id, chunks)
            except Exception as e:  # noqa: BLE001 - whatever it is, it must not cost the job
                log.warning("job %s: %d bytes of log not stored (%s)", self.job_id,
                            sum(len(c) for c in chunks), e)

    async def close(self) -> None:
        """Stop the flusher and write whatever is left, partial lines included."""
        if self._task is None and not (self._pending or self._dropped or self._decoders):
            return  # nothing was logged (a native job's usual case): nothing to do
        if self._task:
            # the flusher ends after its flush in hand, not in it: canceled while its write
            # waited (for the worker's one connection), the lines it had taken were lost
            self._closing = True
            self._wake.set()
            try:
                await self._task
            except Exception:  # noqa: BLE001 - flush() logs its own failures
                pass
        for stream in ("stdout", "stderr"):
            dec = self._decoders.get(stream)
            tail = self._partial[stream] + (storable_text(dec.decode(b"", final=True)) if dec else "")
            if tail and self._stored < MAX_LOG_BYTES:
                self._add(tail + "\n")
            elif tail:
                self._dropped += len(tail.encode())
            self._partial[stream] = ""
        if self._dropped:
            self._pending.append(f"[sandmill] {self._dropped} more bytes of log not stored\n")
        await self.flush()
