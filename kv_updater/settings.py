"""Settings for every service: one precedence, one error style.

Precedence (DESIGN.md): command-line flag > environment variable > ``config.py``
(the seed's ``config = {...}`` dict; path from ``--config`` or ``CONFIG_FILE``,
default ``./config.py`` if present) > default.  Environment names are the upper-case
keys.  A bad setting stops start-up with one clear line on stderr and exit code 2.

pydantic-settings does the typing, the environment and the precedence; argparse
builds the flags from the model's fields so every setting has a flag.
"""

from __future__ import annotations

import argparse
import contextvars
import os
import re
import runpy
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, NoReturn, TypeVar

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)
from redis.asyncio.connection import parse_url

from kv_updater.keys import KeyLayout
from kv_updater.message import DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_TYPE_PATTERN, MessageRules

EXIT_BAD_SETTING = 2

# The config.py values of the load in progress (a settings source cannot take arguments).
_config_file_values: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "config_file_values", default=None
)


class SettingsError(Exception):
    """A setting that cannot be used; the message is the one line the user sees."""


class CommonSettings(BaseSettings):
    """Settings every service reads."""

    model_config = SettingsConfigDict(extra="ignore", case_sensitive=False)

    # Names of fields that hold secrets, masked when settings are logged.

    redis_url: str = Field(
        "redis://localhost:6379/0",
        description="Redis to use: redis://, rediss:// or unix://, with password/ACL user",
    )
    channel: str = Field("update", min_length=1, description="pub/sub channel of the updates")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = Field(
        "INFO", description="DEBUG, INFO, WARNING, ERROR or CRITICAL"
    )
    log_format: Literal["text", "json"] = Field("text", description="text or json log lines")

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: object) -> object:
        return value.strip().upper() if isinstance(value, str) else value

    @field_validator("log_format", mode="before")
    @classmethod
    def _lower_format(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        try:
            parse_url(value)
        except (ValueError, TypeError) as exc:
            raise ValueError(str(exc) or "cannot be parsed") from None
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        config_py = InitSettingsSource(settings_cls, init_kwargs=_config_file_values.get() or {})
        return (init_settings, env_settings, config_py)

    def redacted(self) -> dict[str, Any]:
        """The effective settings for the start-up log line, secrets masked."""
        shown: dict[str, Any] = {}
        for name, info in type(self).model_fields.items():
            value = getattr(self, name)
            if isinstance(value, SecretStr):
                value = "***" if value.get_secret_value() else ""
            elif name == "redis_url":
                value = mask_url(value)
            shown[info.alias or name] = value  # the names users set: "validate"
        return shown


class RedisLayoutSettings(CommonSettings):
    """Settings of the services that read or write the stored state."""

    stored_channel: str = Field("", description="commit notifications (default <channel>:stored)")
    key_prefix: str = Field("", description="prefix of every data key")
    namespace: str = Field("kvupdater:", min_length=1, description="internal keys' namespace")
    type_pattern: str = Field(DEFAULT_TYPE_PATTERN, description="regex a type must match")

    @field_validator("type_pattern")
    @classmethod
    def _check_pattern(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a regular expression: {exc}") from None
        return value

    @model_validator(mode="after")
    def _derive_stored_channel(self) -> RedisLayoutSettings:
        if not self.stored_channel:
            self.stored_channel = f"{self.channel}:stored"
            # Derived, not set: a copy made with exclude_unset derives it again.
            self.__pydantic_fields_set__.discard("stored_channel")
        if self.stored_channel == self.channel:
            raise ValueError(
                "stored_channel must differ from channel (the updater would read its own commits)"
            )
        return self

    @property
    def layout(self) -> KeyLayout:
        return KeyLayout(key_prefix=self.key_prefix, namespace=self.namespace)


class UpdaterSettings(RedisLayoutSettings):
    validate_writes: bool = Field(
        True,
        alias="validate",
        description="read written keys back after each batch and check them",
    )
    max_message_bytes: int = Field(
        DEFAULT_MAX_MESSAGE_BYTES, ge=64, description="larger messages are rejected"
    )
    metrics_port: int = Field(
        0, ge=0, le=65535, description="port of /metrics, /live, /ready (0 = off)"
    )
    metrics_host: str = Field("0.0.0.0", description="address the metrics port binds")  # noqa: S104
    dead_letter: str = Field("", description="stream keeping rejected messages ('' = off)")
    dead_letter_maxlen: int = Field(10_000, ge=1, description="approximate cap of that stream")
    batch_max: int = Field(10_000, ge=1, le=100_000, description="messages per atomic commit")

    model_config = SettingsConfigDict(populate_by_name=True)

    @model_validator(mode="after")
    def _dead_letter_not_a_data_key(self) -> UpdaterSettings:
        own = (self.layout.seq, self.layout.index, self.layout.instants)
        if self.dead_letter and self.dead_letter in own:
            raise ValueError("dead_letter must not be one of the updater's own keys")
        return self

    def message_rules(self) -> MessageRules:
        # A message must never overwrite the dead-letter stream.
        reserved: frozenset[str] = frozenset()
        if self.dead_letter and self.dead_letter.startswith(self.key_prefix):
            reserved = frozenset({self.dead_letter[len(self.key_prefix) :]})
        return MessageRules(
            self.layout,
            max_bytes=self.max_message_bytes,
            type_pattern=self.type_pattern,
            reserved_keys=reserved,
        )


def mask_url(url: str) -> str:
    """redis://user:secret@host -> redis://user:***@host (and the same for a bare password)."""
    # Up to the last "@" before the path: a password may hold an unencoded "@".
    url = re.sub(r"(//[^/@:]*:)[^/]*@", r"\1***@", re.sub(r"(//)([^/@:]+)@", r"\1***@", url))
    # redis-py also takes the password from the query string.
    return re.sub(r"([?&]password=)[^&#]*", r"\1***", url)


S = TypeVar("S", bound=CommonSettings)


def _flag_name(name: str, info: FieldInfo) -> str:
    return "--" + (info.alias or name).replace("_", "-")


def build_parser(cls: type[CommonSettings], prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument(
        "--config",
        metavar="PATH",
        help="config.py holding a dict `config = {...}` (env CONFIG_FILE; default ./config.py)",
    )
    for name, info in cls.model_fields.items():
        key = info.alias or name
        help_text = f"{info.description or ''} (env {key.upper()})"
        if info.annotation is bool:
            parser.add_argument(
                _flag_name(name, info),
                dest=key,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=help_text,
            )
        else:
            parser.add_argument(
                _flag_name(name, info), dest=key, default=None, metavar=key.upper(), help=help_text
            )
    return parser


def _read_config_file(path: str | None, explicit: bool) -> dict[str, Any]:
    if path is None:
        return {}
    if not Path(path).is_file():
        if explicit:
            raise SettingsError(f"config file {path!r} does not exist")
        return {}
    try:
        namespace = runpy.run_path(path)
    except Exception as exc:  # any error in the user's file is a bad setting
        raise SettingsError(f"config file {path!r} failed to load: {exc}") from None
    config = namespace.get("config")
    if not isinstance(config, dict):
        raise SettingsError(f"config file {path!r} must define a dict named `config`")
    return {str(k).lower(): v for k, v in config.items()}


def load_settings(cls: type[S], argv: Sequence[str] | None, prog: str, description: str = "") -> S:
    """Parse flags, environment and config.py into ``cls``; raise SettingsError on bad ones."""
    parser = build_parser(cls, prog, description)
    args = vars(parser.parse_args(argv))
    config_arg = args.pop("config")
    config_path = config_arg or os.environ.get("CONFIG_FILE") or "config.py"
    file_values = _read_config_file(
        config_path, explicit=bool(config_arg or "CONFIG_FILE" in os.environ)
    )
    flags = {k: v for k, v in args.items() if v is not None}
    token = _config_file_values.set(file_values)
    try:
        return cls(**flags)
    except ValidationError as exc:
        raise SettingsError(_one_line(exc, cls)) from None
    finally:
        _config_file_values.reset(token)


def _one_line(exc: ValidationError, cls: type[BaseSettings]) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "settings"
    message = first["msg"].removeprefix("Value error, ")
    value = first.get("input")
    field = cls.model_fields.get(where)
    # Never echo a secret: SecretStr fields, and the URL (it may hold a password).
    secret = where == "redis_url" or (field is not None and field.annotation is SecretStr)
    shown = "" if isinstance(value, dict) or secret else f" (got {value!r})"
    more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"bad setting {where}: {message}{shown}{more}"


def load_or_exit(cls: type[S], argv: Sequence[str] | None, prog: str, description: str = "") -> S:
    """load_settings for a service's main(): one clear line and exit 2 on a bad setting."""
    try:
        return load_settings(cls, argv, prog, description)
    except SettingsError as exc:
        exit_bad_setting(prog, str(exc))


def exit_bad_setting(prog: str, message: str) -> NoReturn:
    """Stop start-up on a bad setting: ``prog: message`` on stderr, exit code 2."""
    print(f"{prog}: {message}", file=sys.stderr)
    raise SystemExit(EXIT_BAD_SETTING)
