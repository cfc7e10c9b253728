"""`gram serve`'s body-size cap, as a client meets it over HTTP (a real server process on a loopback port):
both checks are drilled, each by the request only it can catch.

* A body that declares more than the cap in ``Content-Length`` is refused before it is read: a client that
  declares 10 MB and sends a few bytes gets 413 at once (without the check the server waits for the rest).
* A body without ``Content-Length`` (chunked) is measured as read: valid JSON over the cap is 413, not scored,
  and the replica stops reading at the first chunk past the cap (Ray's proxy may deliver the body in one).
"""

from __future__ import annotations

import json
import socket
import time

import pytest
from serve_fixtures import GramServe

TOKEN = "body-cap-token"
CAP_MB = 0.02  # 20971 bytes


@pytest.fixture(scope="module")
def server():
    """`gram serve tiny` with a 0.02 MB body cap and a token (tests/serve_fixtures.py), ready; yields its port.
    At the end: stopped by PID, and no log of ours or Ray Serve's holds the token."""
    server = GramServe("--max-body-mb", str(CAP_MB), token=TOKEN, prefix="gb")
    try:
        server.wait_ready()
        yield server.port
    finally:
        server.stop()
        # Ray Serve's replica and proxy logs (under the session folder) as well as our own: no token anywhere.
        leaks, replicas = server.scan(TOKEN.encode())
        server.close()
        assert leaks == [] and replicas, (leaks, replicas)


def _raw(port: int, head: str, body: bytes, timeout: float) -> tuple[int, str]:
    """Send ``head`` + ``body`` on a fresh connection and read the answer's status and text (socket timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        conn.sendall(head.encode() + body)
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = conn.recv(65536)
            if not chunk:
                break
            answer += chunk
    status = int(answer.split(b" ", 2)[1])
    return status, answer.split(b"\r\n\r\n", 1)[1].decode(errors="replace")


def test_a_declared_oversize_body_is_refused_before_it_is_read(server):
    head = (f"POST /get_reward HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
            "Content-Type: application/json\r\nContent-Length: 10000000\r\n\r\n")
    started = time.monotonic()
    try:
        status, text = _raw(server, head, b'{"query": [', timeout=30)
    except TimeoutError:
        pytest.fail("no answer in 30 s: the server waited for a 10 MB body it should have refused by its header")
    assert status == 413 and "10000000 bytes" in text, text
    assert time.monotonic() - started < 30


def test_an_undeclared_oversize_body_is_refused_while_read(server):
    body = json.dumps({"query": [], "prompts": [], "labels": [], "pad": "x" * 30000}).encode()
    chunked = b"".join(f"{len(part):x}\r\n".encode() + part + b"\r\n"
                       for part in (body[i:i + 4096] for i in range(0, len(body), 4096))) + b"0\r\n\r\n"
    head = (f"POST /get_reward HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
    status, text = _raw(server, head, chunked, timeout=60)
    assert status == 413 and "stopped reading at" in text, text
    assert 20971 < int(text.split("stopped reading at ")[1].split(")")[0]) <= len(body), text
