"""kv_updater: validates updates from a Redis pub/sub channel and commits them to the KV.

The storage contract (message rules, key layout, stored value, commit) lives here
and is imported by the other services.
"""

from kv_updater.message import Accepted, MessageRules, Rejected, render_event
from kv_updater.service import KVUpdater

__all__ = ["Accepted", "KVUpdater", "MessageRules", "Rejected", "render_event"]
