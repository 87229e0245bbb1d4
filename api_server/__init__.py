"""api_server: REST reads of the updater's KV and an SSE stream of its commits.

One process holds one Redis pub/sub subscription on the stored channel and fans
every commit out to all connected SSE clients (see hub.py and stream.py); REST
reads and stream snapshots run small Lua scripts so that a value and its index
entry are always read together (store.py).
"""
