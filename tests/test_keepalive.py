"""An idle kept-alive connection outlives the clients' own idle expiry: with uvicorn's
default (5 s, httpx's too) a request sent on a connection as the server closes it gets no
answer (seen as httpx.ReadError under load)."""

from __future__ import annotations

import socket
import time

from support import TOKEN


def _get(sock: socket.socket, host: str) -> bytes:
    sock.sendall(f"GET /health HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode())
    sock.settimeout(10)
    data = b""
    while b"\r\n\r\n" not in data or not data.endswith(b"}"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def test_an_idle_connection_stays_open_past_the_clients_expiry(cluster):
    host = cluster.base.removeprefix("http://")
    addr, port = host.split(":")
    with socket.create_connection((addr, int(port))) as sock:
        assert _get(sock, host).startswith(b"HTTP/1.1 200")
        time.sleep(6.5)  # past uvicorn's default of 5 s
        assert _get(sock, host).startswith(b"HTTP/1.1 200"), "the server closed the idle connection"
