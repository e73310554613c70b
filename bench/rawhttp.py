"""A lean HTTP/1.1 load generator for the benchmarks: the same requests a client sends,
over keep-alive connections, parsed only as far as a benchmark needs.

httpx costs 1.7-3.9 ms of CPU per request on the 2-core machine (docs/performance.md),
more than the server and PostgreSQL together, and a benchmark's client runs on the
same cores as what it measures. This one costs a few tens of microseconds a request.
"""

from __future__ import annotations

import asyncio
import time
from urllib.parse import urlsplit


class RawHTTPError(RuntimeError):
    """An answer the benchmark did not expect (status and body)."""


async def _one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes,
               body: bytes) -> tuple[int, bytes]:
    writer.write(head + body)
    status_line = await reader.readline()
    if not status_line:
        raise RawHTTPError("the server closed the connection")
    status = int(status_line.split()[1])
    length, chunked = 0, False
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    if not chunked:
        return status, await reader.readexactly(length)
    out = bytearray()
    while (size := int((await reader.readline()).split(b";")[0], 16)) > 0:
        out += await reader.readexactly(size)
        await reader.readline()
    await reader.readline()
    return status, bytes(out)


def _head(base_url: str, path: str, body: bytes, headers: dict[str, str]) -> tuple[str, int, bytes]:
    u = urlsplit(base_url)
    host, port = u.hostname or "127.0.0.1", u.port or 80
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n"
            + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n").encode()
    return host, port, head


async def time_each(base_url: str, path: str, body: bytes, headers: dict[str, str], n: int,
                    warmup: int = 5, expect: int = 200) -> list[float]:
    """POST ``body`` ``warmup`` + ``n`` times, one after the other over one keep-alive
    connection; the wall ms of each of the last ``n``, from the request's write to its
    answer's last byte. Raises RawHTTPError on any status but ``expect``."""
    host, port, head = _head(base_url, path, body, headers)
    reader, writer = await asyncio.open_connection(host, port)
    out: list[float] = []
    try:
        for i in range(warmup + n):
            t0 = time.perf_counter()
            status, answer = await _one(reader, writer, head, body)
            if status != expect:
                raise RawHTTPError(f"POST {path}: {status} {answer[:300]!r}")
            if i >= warmup:
                out.append((time.perf_counter() - t0) * 1000)
    finally:
        writer.close()
    return out


async def post_many(base_url: str, path: str, body: bytes, headers: dict[str, str], n: int,
                    concurrency: int = 20, expect: int = 201) -> list[bytes]:
    """POST ``body`` (JSON) to ``path`` ``n`` times over ``concurrency`` keep-alive
    connections; the answers' bodies in the order sent. Raises RawHTTPError on any
    status but ``expect``."""
    host, port, head = _head(base_url, path, body, headers)
    out: list[bytes] = [b""] * n
    todo = iter(range(n))

    async def conn() -> None:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            for i in todo:
                status, answer = await _one(reader, writer, head, body)
                if status != expect:
                    raise RawHTTPError(f"POST {path}: {status} {answer[:300]!r}")
                out[i] = answer
        finally:
            writer.close()

    await asyncio.gather(*(conn() for _ in range(min(concurrency, n))))
    return out
