"""Running the server: one process, or N processes sharing a port with SO_REUSEPORT."""

from __future__ import annotations

import asyncio
import gc
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from .app import create_app
from .backups.download import OPEN_BACKUPS
from .config import Config, load_config
from .directory import DIRECTORY
from .http.connections import (
    DESCRIPTORS,
    ConnectionGuard,
    QuietLoopErrors,
    connection_cap,
    descriptor_budget,
    raise_open_files_limit,
)
from .http.listening import Acceptor, bind, defer_accept_until_data
from .telemetry.logs import configure_logging
from .telemetry.metrics import METRICS

log = logging.getLogger("gateway")

# connections the kernel holds for a process busy elsewhere; beyond it, new ones wait a
# second for their SYN to be sent again
LISTEN_BACKLOG = 1024

# The signals that stop a server. A worker is born with them blocked (a mask survives the
# exec of a spawned interpreter) and unblocks them once its handlers are installed, so a
# SIGTERM sent in between waits for the handler instead of killing the worker half-started.
STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGHUP})


async def serve_async(config: Config, reuse_port: bool = False) -> None:
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(QuietLoopErrors())
    open_files = raise_open_files_limit()
    guard = ConnectionGuard(
        connection_cap(config.server.max_connections, open_files),
        config.server.request_head_timeout_seconds,
        descriptors=descriptor_budget(open_files),
    )
    app = create_app(config)
    guard.export(app[METRICS])
    app[DESCRIPTORS] = guard  # an upload's files are counted there too
    if OPEN_BACKUPS in app:
        # a local download or restore holds a backup's descriptor beside its connection's:
        # counted in the same budget as it opens
        app[OPEN_BACKUPS].descriptors = guard
    runner = web.AppRunner(
        app,
        access_log=None,  # ours, with route templates and user ids, is in request_context
        handle_signals=False,
        shutdown_timeout=config.server.shutdown_grace_seconds,
    )
    await runner.setup()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGHUP, app[DIRECTORY].reload_now)
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    # A worker started by _run_workers has these blocked until now; one that arrived in
    # between is delivered here, to the handlers just installed.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    # every connection is admitted (or refused) by the guard, and made aiohttp's once its
    # first head is complete (runner.server: aiohttp's protocol factory)
    assert runner.server is not None  # made by setup()
    acceptor = Acceptor(guard, runner.server)
    try:
        sockets = await bind(
            config.server.host, config.server.port, LISTEN_BACKLOG, reuse_port=reuse_port
        )
        defer_accept_until_data(sockets)
        acceptor.start(sockets)
        # What start-up made (modules, botocore's models, the app) lives as long as the
        # process: out of the collector's full passes, which otherwise walk it all again
        # (~80,000 objects, ~30 ms) each time connections churn enough to trigger one.
        gc.collect()  # start-up's own garbage is not kept for good
        gc.freeze()
        for sock in sockets:
            host, port = sock.getsockname()[:2]
            log.info(
                "listening on http://%s:%s",
                host if ":" not in host else f"[{host}]",
                port,
                extra={"fields": {"host": host, "port": port}},
            )
        await stop.wait()
        log.info("shutting down: no new connections, finishing requests in flight")
    finally:
        # Nothing is accepted any more, and connections still without a head are the
        # guard's alone: closed first. Then aiohttp lets in-flight requests finish (bounded
        # by the grace period), then runs cleanup_ctx, which closes the storage client.
        acceptor.stop()
        guard.close_waiting()
        await runner.cleanup()
        log.info("stopped")


def run_server(config: Config, config_path: Path) -> int:
    configure_logging(config.logging)
    workers = config.server.workers
    if workers == 1:
        asyncio.run(serve_async(config))
        return 0
    return _run_workers(config_path, workers)


def _worker_main(config_path: str) -> None:
    config = load_config(config_path)
    configure_logging(config.logging)
    asyncio.run(serve_async(config, reuse_port=True))


RESTART_PAUSE_SECONDS = 1.0  # a worker that dies this young is replaced after a pause


def _run_workers(config_path: Path, workers: int) -> int:
    """N independent processes on one port; the kernel spreads connections between them.

    A worker that dies while the gateway runs (killed, crashed) is logged and replaced;
    one that dies right after starting is replaced after a pause, so a broken start-up
    never becomes a fork loop. SIGTERM and SIGINT stop them all; SIGHUP is forwarded."""
    context = multiprocessing.get_context("spawn")
    stopping = False
    children: dict[int, Any] = {}

    def start(slot: int) -> None:
        child = context.Process(
            target=_worker_main, args=(str(config_path),), name=f"worker-{slot}"
        )
        # Blocked here, the signals are inherited blocked by the child, and one that reaches
        # this process meanwhile is handled only once the child is in `children`, where
        # `forward` finds it.
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            child.start()
            child.started_at = time.monotonic()  # type: ignore[attr-defined]
            children[slot] = child
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        if signum in (signal.SIGTERM, signal.SIGINT):
            stopping = True
        for child in children.values():
            if child.pid is not None and child.is_alive():
                os.kill(child.pid, signum)

    # Installed before the first worker starts: a stop at any moment reaches every worker.
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGHUP, forward)
    for slot in range(workers):
        start(slot)
    exit_codes: list[int] = []
    while children:
        multiprocessing.connection.wait([c.sentinel for c in children.values()], timeout=1)
        for slot, child in list(children.items()):
            if child.is_alive():
                continue
            child.join()
            del children[slot]
            if stopping:
                # A worker ended by the stop's own signal (it came before its handlers, or
                # a second one during its shutdown) stopped as asked: that is a clean exit.
                ended_by_stop = child.exitcode in (-signal.SIGTERM, -signal.SIGINT)
                exit_codes.append(0 if ended_by_stop else child.exitcode or 0)
                continue
            log.warning(
                "worker %s (pid %s) exited with %s; starting a new one",
                slot,
                child.pid,
                child.exitcode,
                extra={
                    "fields": {"worker": slot, "worker_pid": child.pid, "exitcode": child.exitcode}
                },
            )
            if time.monotonic() - child.started_at < RESTART_PAUSE_SECONDS:
                time.sleep(RESTART_PAUSE_SECONDS)
            if not stopping:
                start(slot)
    return 0 if all(code == 0 for code in exit_codes) else 1
