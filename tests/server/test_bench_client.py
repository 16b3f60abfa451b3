"""The load generator of `kubeinfer bench serve` / `peers` (aiohttp) against a bare HTTP/1.1 server written here, so
that each misbehaviour is exact: SSE events in chunked bodies, an error event mid-stream, an HTTP error status,
and a kept-alive connection the server closes before answering (llama-server's HTTP library closes each
connection after a few requests), which the client retries once on a fresh connection."""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Awaitable, Callable

import pytest
from kubeinfer.engine.bench.serve import run_load

pytestmark = pytest.mark.timeout(60)

Respond = Callable[[int, asyncio.StreamWriter], Awaitable[bool]]  # (request on this connection) -> keep it open


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _event(payload: dict) -> bytes:
    return _chunk(b"data: " + json.dumps(payload).encode() + b"\n\n")


async def _stream(writer: asyncio.StreamWriter, tokens: int, *, error_after: int | None = None) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
    for i in range(tokens):
        if error_after is not None and i == error_after:
            writer.write(_event({"error": {"message": "the engine step failed", "code": 500}}))
            break
        writer.write(_event({"choices": [{"index": 0, "delta": {"content": f" t{i}"}}]}))
        await writer.drain()
    else:
        writer.write(_event({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": tokens}}))
    writer.write(_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
    await writer.drain()


class BareServer:
    """Counts requests (all, and per connection) and answers each with ``respond``."""

    def __init__(self, respond: Respond) -> None:
        self.respond, self.requests, self.connections = respond, 0, 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        on_this_connection = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                await reader.readexactly(length)
                self.requests += 1
                on_this_connection += 1
                if not await self.respond(on_this_connection, writer):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()


async def _load(respond: Respond, prompts: int, concurrency: int) -> tuple[object, BareServer]:
    bare = BareServer(respond)
    server = await asyncio.start_server(bare.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    args = argparse.Namespace(base_url=f"http://127.0.0.1:{port}/v1", api_key=None, model="m", endpoint="chat",
                              temperature=0.0, request_rate=None, seed=0, timeout=30.0)
    try:
        summary = await run_load(args, ["hello"] * prompts, [5] * prompts, concurrency)
    finally:
        server.close()
    return summary, bare


def test_tokens_timings_and_usage_come_from_the_stream() -> None:
    async def respond(_: int, writer: asyncio.StreamWriter) -> bool:
        await _stream(writer, 5)
        return True

    summary, bare = asyncio.run(_load(respond, prompts=4, concurrency=2))
    assert (summary.completed, summary.errors, bare.requests) == (4, 0, 4)
    assert summary.output_throughput > 0 and summary.ttft_ms["p50"] > 0
    assert summary.total_token_throughput > summary.output_throughput  # the usage event's prompt tokens


def test_a_connection_closed_before_its_answer_is_retried_once() -> None:
    """The second request on every connection finds it closed: each is sent again on a new one and succeeds."""
    async def respond(on_this_connection: int, writer: asyncio.StreamWriter) -> bool:
        if on_this_connection > 1:
            return False  # closed without an answer
        await _stream(writer, 5)
        return True

    summary, bare = asyncio.run(_load(respond, prompts=3, concurrency=1))
    assert (summary.completed, summary.errors) == (3, 0)
    assert bare.requests == 5 and bare.connections == 3  # requests 2 and 3 were sent twice


def test_an_error_event_and_an_error_status_fail_their_request_with_the_reason() -> None:
    async def respond(on_this_connection: int, writer: asyncio.StreamWriter) -> bool:
        if on_this_connection == 1:
            await _stream(writer, 5, error_after=2)
            return True
        body = b'{"error": {"message": "queue full"}}'
        writer.write(b"HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\n"
                     b"content-length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        return True

    summary, _ = asyncio.run(_load(respond, prompts=2, concurrency=1))
    assert (summary.completed, summary.errors) == (0, 2)
    assert "the engine step failed" in summary.first_error
