"""``python -m kv_updater`` / ``kv-updater``: run the updater until SIGINT or SIGTERM."""

from __future__ import annotations

import asyncio
import gc
import signal
import sys
from collections.abc import Sequence

from kv_updater.eventloop import new_event_loop
from kv_updater.logs import setup_logging
from kv_updater.service import KVUpdater
from kv_updater.settings import SettingsError, UpdaterSettings, exit_bad_setting, load_or_exit

PROG = "kv-updater"


async def _serve(updater: KVUpdater) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, updater.stop)
    await updater.run()


def main(argv: Sequence[str] | None = None) -> None:
    settings = load_or_exit(
        UpdaterSettings,
        argv,
        PROG,
        "Subscribe to the update channel and commit every valid message to the Redis KV.",
    )
    setup_logging(settings.log_level, settings.log_format)
    updater = KVUpdater(settings=settings)
    # Each message allocates a few containers that refcounting frees at once; the
    # default gen-0 threshold (700) would run the cyclic collector every few
    # hundred messages for nothing.  Start-up objects are frozen out of its scans.
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
    try:
        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            runner.run(_serve(updater))
    except SettingsError as exc:  # found only at start-up, e.g. a metrics port in use
        exit_bad_setting(PROG, str(exc))
    sys.exit(0)


if __name__ == "__main__":
    main()
