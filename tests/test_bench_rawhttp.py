"""bench/rawhttp.py, the benchmarks' lean HTTP client: keep-alive POSTs in order, both
body framings, timed one after the other, and an unexpected status as an error."""

from __future__ import annotations

import asyncio

import pytest

from bench.rawhttp import RawHTTPError, post_many, time_each


async def _server(answers):
    """A keep-alive HTTP/1.1 server answering each request with the next of ``answers``
    (raw bytes); returns (server, port, the request bodies it got)."""
    got: list[bytes] = []
    it = iter(answers)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await reader.readuntil(b"\r\n\r\n") if not reader.at_eof() else b""
            if not head:
                break
            length = int(next(l for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")).split(b":")[1])
            got.append(await reader.readexactly(length))
            writer.write(next(it))
            await writer.drain()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    return srv, srv.sockets[0].getsockname()[1], got


async def test_posts_in_order_over_keep_alive_both_framings() -> None:
    answers = [b"HTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nid",
               b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
               b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n"]
    srv, port, got = await _server(answers)
    async with srv:
        out = await post_many(f"http://127.0.0.1:{port}", "/x", b'{"a": 1}', {"Authorization": "Bearer t"},
                              3, concurrency=1)
    assert out == [b"id", b"abcde", b""]
    assert got == [b'{"a": 1}'] * 3


async def test_an_unexpected_status_is_an_error() -> None:
    srv, port, _ = await _server([b"HTTP/1.1 422 Unprocessable\r\ncontent-length: 5\r\n\r\nnope!"])
    async with srv:
        with pytest.raises(RawHTTPError, match="422"):
            await post_many(f"http://127.0.0.1:{port}", "/x", b"{}", {}, 1)


async def test_time_each_times_only_the_runs_after_the_warm_up() -> None:
    ok = b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\n1"
    srv, port, got = await _server([ok] * 5)
    async with srv:
        ms = await time_each(f"http://127.0.0.1:{port}", "/x", b"{}", {}, 3, warmup=2)
    assert len(ms) == 3 and all(0 < m < 5000 for m in ms)
    assert len(got) == 5
    srv, port, _ = await _server([ok, b"HTTP/1.1 500 Oops\r\ncontent-length: 0\r\n\r\n"])
    async with srv:
        with pytest.raises(RawHTTPError, match="500"):
            await time_each(f"http://127.0.0.1:{port}", "/x", b"{}", {}, 1, warmup=1)
