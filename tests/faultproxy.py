"""A small TCP proxy that sits between the gateway and the S3 server and misbehaves on demand."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field


@dataclass
class Faults:
    delay: float = 0.0  # before forwarding each chunk from upstream
    drop: bool = False  # accept, read, never answer
    reset_after_bytes: int | None = None  # reset the client once this much of a response passed
    trickle: float = 0.0  # seconds between single bytes of the response
    connections: int = 0
    tasks: set[asyncio.Task[None]] = field(default_factory=set)


class FaultProxy:
    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.faults = Faults()
        self._server: asyncio.Server | None = None
        self.port = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self.faults.tasks):
                task.cancel()
            await self._server.wait_closed()

    def reset(self) -> None:
        tasks = self.faults.tasks
        self.faults = Faults(tasks=tasks)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.faults.tasks.add(task)
        self.faults.connections += 1
        try:
            if self.faults.drop:
                await reader.read()  # hold the connection, answer nothing
                return
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
            try:
                await asyncio.gather(
                    self._pipe(reader, up_writer, respond=False),
                    self._pipe(up_reader, writer, respond=True),
                )
            finally:
                up_writer.close()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.faults.tasks.discard(task)
            with contextlib.suppress(Exception):
                writer.close()

    async def _pipe(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, respond: bool
    ) -> None:
        sent = 0
        while data := await src.read(65536):
            faults = self.faults
            if respond and faults.delay:
                await asyncio.sleep(faults.delay)
            if respond and faults.reset_after_bytes is not None:
                room = faults.reset_after_bytes - sent
                if len(data) > room:
                    dst.write(data[: max(room, 0)])
                    await dst.drain()
                    dst.transport.abort()  # RST mid-response
                    return
            if respond and faults.trickle:
                for i in range(len(data)):
                    dst.write(data[i : i + 1])
                    await dst.drain()
                    await asyncio.sleep(faults.trickle)
            else:
                dst.write(data)
                await dst.drain()
            sent += len(data)
        with contextlib.suppress(Exception):
            dst.write_eof()
