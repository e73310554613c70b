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
        # no task per job: a timer (a loop handle) starts a write FLUSH_EVERY_S after the
        # first pending line, or at once past FLUSH_BYTES; most jobs end before it fires
        self._timer: asyncio.TimerHandle | None = None
        self._flushing: asyncio.Task | None = None  # the write in hand
        self._flushed = False  # some of the log was written (or is being) by a statement
        self._closing = False
        self._finished = False  # the partial lines and the dropped count are pending
        self._wake = _Wake(self)

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
        if self._closing:
            return  # close() or take() writes or hands out what is pending
        if self._pending_bytes >= FLUSH_BYTES:
            self._due()
        elif self._timer is None and self._flushing is None:
            self._timer = asyncio.get_running_loop().call_later(FLUSH_EVERY_S, self._due)

    def _due(self) -> None:
        """Start a write of what is pending (the timer's, or FLUSH_BYTES reached)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._flushing is None and self._pending and not self._closing:
            self._flushed = True
            self._flushing = asyncio.get_running_loop().create_task(self._flush_then_rearm())

    async def _flush_then_rearm(self) -> None:
        try:
            await self.flush()
        finally:
            self._flushing = None
            if self._pending and not self._closing:  # lines came meanwhile
                if self._pending_bytes >= FLUSH_BYTES:
                    self._due()
                else:
                    self._timer = asyncio.get_running_loop().call_later(FLUSH_EVERY_S, self._due)

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

    def take(self, limit: int = FLUSH_BYTES) -> str | None:
        """End the sink and hand out the job's whole log as one text ('' for none), for
        the completion to carry (one statement less per job that prints): only when none
        of it was written or is being written yet and it is at most ``limit`` bytes.
        None otherwise: then close() writes the rest as before."""
        if self._flushed or self._flushing is not None:
            return None
        self._closing = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._finish()
        if self._pending_bytes > limit:
            return None
        text = "".join(self._pending)
        self._pending, self._pending_bytes = [], 0
        return text

    def _finish(self) -> None:
        """Move the partial lines and the count of dropped bytes to the pending text."""
        if self._finished:
            return
        self._finished = True
        for stream in ("stdout", "stderr"):
            dec = self._decoders.get(stream)
            tail = self._partial[stream] + (storable_text(dec.decode(b"", final=True)) if dec else "")
            if tail and self._stored < MAX_LOG_BYTES:
                self._add(tail + "\n")
            elif tail:
                self._dropped += len(tail.encode())
            self._partial[stream] = ""
        if self._dropped:
            note = f"[sandmill] {self._dropped} more bytes of log not stored\n"
            self._pending.append(note)
            self._pending_bytes += len(note)

    def idle(self) -> bool:
        """Nothing was logged and nothing is to write (a native job's usual case)."""
        return (self._flushing is None and not self._flushed
                and not (self._pending or self._dropped or self._decoders))

    async def close(self) -> None:
        """Stop the timer and write whatever is left, partial lines included."""
        if self._flushing is None and not (self._pending or self._dropped or self._decoders):
            return  # nothing was logged (a native job's usual case): nothing to do
        self._closing = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._flushing is not None:
            # the write in hand ends first, not canceled: canceled while it waited (for the
            # worker's one connection), the lines it had taken were lost; the rest follows it
            try:
                await self._flushing
            except Exception:  # noqa: BLE001 - flush() logs its own failures
                pass
        self._finish()
        await self.flush()


class _Wake:
    """``sink._wake.set()``: write what is pending now (as FLUSH_BYTES reached does)."""

    def __init__(self, sink: LogSink):
        self.sink = sink

    def set(self) -> None:
        self.sink._due()
