"""Settings of the API server (DESIGN.md's table), on kv_updater's loader.

Same precedence and error style as every service: flag > environment > config.py
> default, one clear line and exit 2 on a bad setting.
"""

from __future__ import annotations

from pydantic import Field, SecretStr, field_validator

from kv_updater.message import MessageRules
from kv_updater.settings import RedisLayoutSettings


class ApiSettings(RedisLayoutSettings):

    host: str = Field("0.0.0.0", description="address to listen on")  # noqa: S104
    port: int = Field(8000, ge=1, le=65535, description="port to listen on")
    cors_origins: str = Field(
        "", description="comma-separated origins allowed by CORS ('' = none)"
    )
    api_token: SecretStr = Field(
        SecretStr(""),
        description="when set, every route but /live and /ready needs it "
        "(Authorization: Bearer or ?token=)",
    )
    max_sse_clients: int = Field(
        10_000, ge=0, description="open SSE streams at most; more are answered 503"
    )
    keepalive_seconds: float = Field(
        15.0, gt=0, le=3600, description="interval of SSE keep-alive comments"
    )
    sse_flush_ms: float = Field(
        0.0, ge=0, le=1000,
        description="write to SSE clients at most once per this many ms (0 = as commits "
        "arrive; commits that arrive together still go out in one write)",
    )
    sse_stall_timeout: float = Field(
        60.0, ge=0, le=86_400,
        description="close an SSE stream whose client has taken no bytes for this many "
        "seconds (0 = never); its EventSource reconnects and resumes",
    )
    redis_max_connections: int = Field(
        64, ge=1, le=10_000, description="Redis connections for reads (requests queue beyond)"
    )
    shutdown_timeout: float = Field(
        3.0, ge=0, le=60, description="seconds open requests get at shutdown before cancelling"
    )

    @field_validator("cors_origins")
    @classmethod
    def _check_origins(cls, value: str) -> str:
        for origin in _split(value):
            if origin != "*" and not origin.startswith(("http://", "https://")):
                raise ValueError(f"origin {origin!r} must start with http:// or https://")
        return value

    @property
    def origins(self) -> list[str]:
        return [o.rstrip("/") for o in _split(self.cors_origins)]

    @property
    def token(self) -> str:
        return self.api_token.get_secret_value()

    def type_rules(self) -> MessageRules:
        """The updater's own type rules: pattern and reserved namespace."""
        return MessageRules(self.layout, type_pattern=self.type_pattern)


def _split(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]
