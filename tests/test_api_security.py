"""api_token and CORS."""

from __future__ import annotations

import asyncio

from api_fixtures import SseStream, commit_sync, running_api

TOKEN = "s3cret-token-for-tests"


def test_token_guards_everything_but_health(redis_url: str) -> None:
    commit_sync(redis_url, ["a"])
    with running_api(redis_url, env={"API_TOKEN": TOKEN}) as api:
        for path in ("/live", "/ready"):
            assert api.get(path).status_code == 200, path
        for path in ("/keys", "/keys/a", "/key/a", "/metrics", "/stats", "/openapi.json",
                     "/docs", "/", "/static/app.js"):
            resp = api.get(path)
            assert resp.status_code == 401, path
            assert resp.json() == {"detail": "missing or invalid token"}
            assert resp.headers["www-authenticate"].startswith("Bearer")
            assert api.get(path, headers={"Authorization": "Bearer nope"}).status_code == 401
            assert api.get(path, params={"token": TOKEN[:-1]}).status_code == 401
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        assert api.get("/keys/a", headers=bearer).json()["type"] == "a"
        assert api.get("/keys/a", params={"token": TOKEN}).json()["type"] == "a"
        assert api.get("/metrics", headers=bearer).status_code == 200
        # Swagger UI fetches the schema with the token it was opened with.
        docs = api.get("/docs", params={"token": TOKEN})
        assert docs.status_code == 200
        assert f"/openapi.json?token={TOKEN}" in docs.text

        async def stream() -> None:
            refused = await SseStream.open(api.port, "/events")
            assert refused.status == 401
            ok = await SseStream.open(api.port, f"/events?token={TOKEN}")
            assert ok.status == 200
            event = await asyncio.wait_for(ok.next_event(), 10)
            assert event is not None
            assert event.id == 1
            await ok.aclose()

        asyncio.run(stream())
        assert TOKEN not in api.service.log, "the token must never be logged"
        assert "'api_token': '***'" in api.service.log


def test_cors_only_for_listed_origins(redis_url: str) -> None:
    commit_sync(redis_url, ["a"])
    good, evil = "https://dash.example", "https://evil.example"
    with running_api(redis_url, ["--cors-origins", f"{good}, http://localhost:3000"],
                     env={"API_TOKEN": TOKEN}) as api:
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        ok = api.get("/keys/a", headers={**bearer, "Origin": good})
        assert ok.headers["access-control-allow-origin"] == good
        bad = api.get("/keys/a", headers={**bearer, "Origin": evil})
        assert "access-control-allow-origin" not in bad.headers
        # A preflight carries no token and must still be answered for a listed origin.
        preflight = {"Access-Control-Request-Method": "GET",
                     "Access-Control-Request-Headers": "authorization,last-event-id"}
        yes = api.get_options("/events", headers={**preflight, "Origin": good})
        assert yes.status_code == 200
        assert yes.headers["access-control-allow-origin"] == good
        allowed = yes.headers["access-control-allow-headers"].lower()
        assert "authorization" in allowed
        assert "last-event-id" in allowed
        no = api.get_options("/events", headers={**preflight, "Origin": evil})
        assert no.status_code == 400
        assert "access-control-allow-origin" not in no.headers
        # A refused token still tells the listed origin why (readable 401).
        denied = api.get("/keys/a", headers={"Origin": good})
        assert denied.status_code == 401
        assert denied.headers["access-control-allow-origin"] == good
    with running_api(redis_url) as api:
        plain = api.get("/keys/a", headers={"Origin": good})
        assert plain.status_code == 200
        assert "access-control-allow-origin" not in plain.headers
