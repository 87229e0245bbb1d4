"""``python -m api_server`` / ``api-server``: serve the API with uvicorn until SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import signal
import sys
from collections.abc import Sequence
from types import FrameType

import uvicorn

from api_server.app import create_app
from api_server.hub import Hub
from api_server.settings import ApiSettings
from kv_updater.logs import setup_logging
from kv_updater.settings import load_or_exit

PROG = "api-server"
EXIT_STARTUP_FAILURE = 3
log = logging.getLogger("api_server")


def _raise_open_files_limit() -> None:
    """Every SSE client is a socket: use the hard limit, not the shell's soft one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = 1_048_576 if hard == resource.RLIM_INFINITY else hard
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


class _Server(uvicorn.Server):
    """uvicorn's server, ending every SSE stream as soon as the exit signal comes.

    uvicorn would otherwise wait for open responses (endless streams) until its
    graceful-shutdown timeout and then cancel them.
    """

    def __init__(self, config: uvicorn.Config, hub: Hub) -> None:
        super().__init__(config)
        self.hub = hub

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        with contextlib.suppress(RuntimeError):  # no loop yet: nothing is open
            asyncio.get_running_loop().call_soon_threadsafe(self.hub.close_all)


def _after_shutdown(signum: int, frame: FrameType | None) -> None:
    log.debug("signal %d after shutdown: already stopped", signum)


def main(argv: Sequence[str] | None = None) -> None:
    settings = load_or_exit(
        ApiSettings,
        argv,
        PROG,
        "Serve REST reads of the Redis KV and an SSE stream of its commits.",
    )
    setup_logging(settings.log_level, settings.log_format)
    _raise_open_files_limit()
    log.info("api-server starting with %s", settings.redacted())
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop" if sys.platform != "win32" else "asyncio",
        http="httptools",
        ws="none",
        lifespan="on",
        log_config=None,
        access_log=False,
        backlog=4096,
        timeout_graceful_shutdown=max(1, round(settings.shutdown_timeout)),
        server_header=False,
    )
    server = _Server(config, app.state.hub)
    # uvicorn re-raises the signal that stopped it once it has shut down, under
    # the handlers found at start: make those a no-op so a graceful SIGTERM or
    # SIGINT ends with exit code 0 (DESIGN.md), not death by signal.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _after_shutdown)
    server.run()
    if not server.started:
        log.error("api-server could not start (see above)")
        sys.exit(EXIT_STARTUP_FAILURE)
    log.info("api-server stopped")
    sys.exit(0)


if __name__ == "__main__":
    main()
