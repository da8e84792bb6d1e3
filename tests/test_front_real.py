"""The front door in front of the real llama-server and model: streams pass, slots are freed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from corral.front import FrontDoor, FrontSettings, Upstream
from tests.harness import end_process, free_port, wait_for

pytestmark = [pytest.mark.real, pytest.mark.timing]  # latency figures
DEADLINE = 60.0


@pytest.fixture(scope="module")
def llama(real_binary: Path, real_model: Path) -> Iterator[Upstream]:
    """A real llama-server (one slot) on a loopback port."""
    port = free_port()
    proc = subprocess.Popen([str(real_binary), "--model", str(real_model), "--host",
                             "127.0.0.1", "--port", str(port), "-np", "1", "-c", "2048"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        def ready() -> bool:
            assert proc.poll() is None, f"llama-server exited with {proc.returncode}"
            return _healthy(port)
        wait_for(ready, 120, "llama-server ready", interval=0.05)
        yield Upstream("127.0.0.1", port, 1)
    finally:
        end_process(proc)


def _healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@contextlib.asynccontextmanager
async def door_to(upstream: Upstream) -> AsyncIterator[tuple[FrontDoor, str]]:
    sock = socket.create_server(("127.0.0.1", 0))
    door = FrontDoor(sock, FrontSettings())
    door.route_to(upstream)
    task = asyncio.create_task(door.serve())
    try:
        yield door, f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_a_streamed_chat_completion_arrives_whole(llama: Upstream) -> None:
    """Tokens stream through event by event and the stream ends with [DONE]."""
    async with door_to(llama) as (door, url), \
            httpx.AsyncClient(base_url=url, timeout=DEADLINE) as c:
        body = {"messages": [{"role": "user", "content": "Count to five."}],
                "max_tokens": 16, "stream": True, "temperature": 0}
        events = []
        async with c.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
        assert events[-1] == "[DONE]" and len(events) > 3
        assert json.loads(events[0])["object"] == "chat.completion.chunk"
        assert door.in_flight() == 0 and door.stats().requests_total == {"2xx": 1}


async def test_a_streaming_client_that_hangs_up_frees_its_slot(llama: Upstream) -> None:
    """llama-server stops generating for a client that left through the front door."""
    async with door_to(llama) as (door, url):
        port = int(url.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        body = json.dumps({"prompt": "Once upon a time", "n_predict": 4000,
                           "ignore_eos": True, "stream": True}).encode()
        writer.write(b"POST /completion HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                     b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        async with asyncio.timeout(DEADLINE):
            while b"data: " not in await reader.readline():
                pass
        assert await processing_slots(llama) == 1
        writer.close()
        await writer.wait_closed()
        async with asyncio.timeout(DEADLINE):
            while await processing_slots(llama) or door.in_flight():
                await asyncio.sleep(0.02)


async def processing_slots(up: Upstream) -> int:
    async with httpx.AsyncClient(timeout=DEADLINE) as c:
        slots = (await c.get(f"http://{up.host}:{up.port}/slots")).json()
    return sum(1 for s in slots if s.get("is_processing"))
