"""``python -m demo_publisher`` / ``demo-publisher``: publish the demo feeds until stopped."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

from demo_publisher.publisher import Publisher
from demo_publisher.settings import PublisherSettings
from kv_updater.eventloop import new_event_loop
from kv_updater.logs import setup_logging
from kv_updater.settings import load_or_exit

PROG = "demo-publisher"
DESCRIPTION = (
    "Publish realistic demo updates (weather, air quality, moon phase, sensors) on the "
    "update channel at a chosen rate."
)


async def _serve(publisher: Publisher) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, publisher.stop)
    await publisher.run()


def main(argv: Sequence[str] | None = None) -> None:
    settings = load_or_exit(PublisherSettings, argv, PROG, DESCRIPTION)
    setup_logging(settings.log_level, settings.log_format)
    logging.getLogger("demo_publisher").info("starting with %s", settings.redacted())
    publisher = Publisher(settings)
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(_serve(publisher))
    sys.exit(0)


if __name__ == "__main__":
    main()
