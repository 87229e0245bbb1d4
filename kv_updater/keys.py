"""Where everything lives in Redis: the key layout shared by every service.

Contract keys (DESIGN.md): ``<namespace>seq`` (global commit sequence) and
``<namespace>index`` (sorted set of types, scored by the seq of their last
commit).  ``<namespace>instants`` is the updater's own: a hash of type -> instant
key of the stored value, which is what stale protection compares against.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class KeyLayout:
    key_prefix: str = ""
    namespace: str = "kvupdater:"

    @property
    def seq(self) -> str:
        return f"{self.namespace}seq"

    @property
    def index(self) -> str:
        return f"{self.namespace}index"

    @property
    def instants(self) -> str:
        return f"{self.namespace}instants"

    def data_key(self, type_: str) -> str:
        return self.key_prefix + type_

    def is_reserved(self, type_: str) -> bool:
        """True when a message of this type would write into the internal namespace."""
        return type_.startswith(self.namespace) or (self.key_prefix + type_).startswith(
            self.namespace
        )
