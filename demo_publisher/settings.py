"""The publisher's settings: the shared ones plus the load it generates."""

from __future__ import annotations

from pydantic import Field

from kv_updater.settings import CommonSettings


class PublisherSettings(CommonSettings):
    rate: float = Field(
        10.0, ge=0, le=10_000_000, description="messages per second over all keys (0 = flat out)"
    )
    keys: int = Field(16, ge=1, le=100_000, description="how many distinct keys (types) to feed")
    count: int = Field(0, ge=0, description="stop after this many messages (0 = no limit)")
    duration: float = Field(0.0, ge=0, description="stop after this many seconds (0 = no limit)")
    seed: int | None = Field(None, description="random seed, for repeatable values")
    progress_interval: float = Field(
        5.0, gt=0, description="seconds between progress lines"
    )
    batch_max: int = Field(
        2000, ge=1, le=100_000, description="most messages sent in one pipelined round trip"
    )
