"""The pump of a bidirectional stream of requests, shared by roi.v1's PoolStream and the Open
Inference Protocol's ModelStreamInfer."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc


async def answer_stream(
    requests: AsyncIterator[bytes],
    context: grpc.aio.ServicerContext,
    answer: Callable[[bytes], Awaitable[bytes]],
    window_size: int,
    closing: asyncio.Event,
) -> AsyncIterator[bytes]:
    """Answers each request of ``requests`` with ``answer`` (concurrently, at most
    ``window_size`` at a time) and yields the answers as they are ready. When ``closing`` is
    set, reading stops, the requests read are answered, and the stream ends with UNAVAILABLE."""
    answers: asyncio.Queue[bytes | None] = asyncio.Queue()
    window = asyncio.Semaphore(window_size)
    tasks: set[asyncio.Task] = set()
    shut_down = False

    async def one(raw: bytes) -> None:
        try:
            await answers.put(await answer(raw))
        finally:
            window.release()

    async def read_all() -> None:
        nonlocal shut_down
        closing_wait = asyncio.ensure_future(closing.wait())
        items = requests.__aiter__()
        try:
            while True:
                # Reading stops while the window is full, and HTTP/2 flow control then
                # slows the sender, instead of the queue refusing its requests.
                await window.acquire()
                reading = asyncio.ensure_future(items.__anext__())
                await asyncio.wait({reading, closing_wait}, return_when=asyncio.FIRST_COMPLETED)
                if not reading.done():
                    reading.cancel()
                    shut_down = True
                    break
                try:
                    raw = reading.result()
                except StopAsyncIteration:
                    break
                task = asyncio.create_task(one(raw))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            closing_wait.cancel()
            await answers.put(None)

    reader = asyncio.create_task(read_all())
    try:
        while True:
            item = await answers.get()
            if item is None:
                break
            yield item
        await reader
    finally:
        reader.cancel()
        for task in list(tasks):
            task.cancel()
    if shut_down:
        await context.abort(
            grpc.StatusCode.UNAVAILABLE,
            "the server is shutting down; requests of this stream that were not answered were not read",
        )
