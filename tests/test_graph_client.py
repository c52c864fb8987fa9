"""The Graph client (shared.graph) against the Graph stand-in over real HTTP on 127.0.0.1."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone

import pytest

from shared.graph import (
    GraphClient,
    GraphError,
    GraphThrottled,
    StaticToken,
    backoff_seconds,
    check_base_url,
    graph_credential,
    graph_scope,
    retry_after_seconds,
)
from shared.settings import Settings, SettingsError
from shared.welcome.policy import USER_SELECT
from tests.fixtures_graph import graph_standin  # noqa: F401  (fixture)
from tools.graph_standin import GraphStandIn

NOW = datetime.now(timezone.utc).replace(microsecond=0)


def run(coro):
    return asyncio.run(coro)


class Sleeps(list):
    """Records the client's waits instead of sleeping them (the HTTP stays real)."""

    async def __call__(self, seconds: float) -> None:
        self.append(seconds)


def client(standin: GraphStandIn, **kwargs) -> GraphClient:
    return GraphClient(standin.base_url, StaticToken(standin.token), **kwargs)


async def read_users(graph: GraphClient, since: datetime) -> list[dict]:
    try:
        return [u async for u in graph.users_created_since(since, USER_SELECT)]
    finally:
        await graph.close()


def test_users_query_has_graph_shape_and_follows_next_links(graph_standin):
    graph_standin.page_limit = 7  # server-driven paging, below the client's $top=999
    for n in range(30):
        graph_standin.add_user(displayName=f"User {n}", mail=f"u{n}@contoso.com", createdDateTime=NOW - timedelta(hours=n))
    users = run(read_users(client(graph_standin), NOW - timedelta(hours=19, minutes=30)))

    assert sorted(u["displayName"] for u in users) == sorted(f"User {n}" for n in range(20))
    assert all(set(u) == set(USER_SELECT) for u in users)
    log = graph_standin.requests
    assert len(log) == 3 and all(r.status == 200 and r.path == "/v1.0/users" for r in log)
    first = log[0].query
    assert first["$filter"] == f"createdDateTime ge {(NOW - timedelta(hours=19, minutes=30)).strftime('%Y-%m-%dT%H:%M:%SZ')}"
    assert first["$top"] == "999" and first["$select"].split(",") == list(USER_SELECT)
    assert all("$skiptoken" in r.query for r in log[1:])


def test_many_pages_of_999(graph_standin):
    for n in range(2100):
        graph_standin.add_user(mail=f"u{n}@contoso.com", createdDateTime=NOW - timedelta(seconds=n))
    users = run(read_users(client(graph_standin), NOW - timedelta(days=1)))
    assert len({u["id"] for u in users}) == 2100
    assert len(graph_standin.requests) == 3


def test_429_with_retry_after_is_honoured(graph_standin):
    graph_standin.add_user(mail="ann@contoso.com", createdDateTime=NOW)
    graph_standin.fail_next(429, count=2, retry_after=3)
    sleeps = Sleeps()
    users = run(read_users(client(graph_standin, sleep=sleeps), NOW - timedelta(hours=1)))
    assert [u["mail"] for u in users] == ["ann@contoso.com"]
    assert sleeps == [3.0, 3.0]
    assert [r.status for r in graph_standin.requests] == [429, 429, 200]


def test_503_without_retry_after_backs_off_exponentially_and_capped(graph_standin):
    graph_standin.add_user(mail="ann@contoso.com", createdDateTime=NOW)
    graph_standin.fail_next(503, count=5)
    sleeps = Sleeps()
    graph = client(graph_standin, sleep=sleeps, backoff_base=1.0, backoff_max=4.0, max_attempts=6, rng=lambda: 1.0)
    users = run(read_users(graph, NOW - timedelta(hours=1)))
    assert len(users) == 1 and sleeps == [1.0, 2.0, 4.0, 4.0, 4.0]


def test_retry_after_longer_than_the_client_waits_gives_up_at_once(graph_standin):
    graph_standin.fail_next(429, count=1, retry_after=600)
    sleeps = Sleeps()
    with pytest.raises(GraphThrottled, match="600"):
        run(read_users(client(graph_standin, sleep=sleeps, retry_after_max=120), NOW))
    assert sleeps == [] and len(graph_standin.requests) == 1


def test_still_throttled_after_max_attempts(graph_standin):
    graph_standin.fail_next(429, count=10, retry_after=1)
    sleeps = Sleeps()
    with pytest.raises(GraphThrottled) as caught:
        run(read_users(client(graph_standin, sleep=sleeps, max_attempts=3), NOW))
    assert caught.value.status == 429 and caught.value.code == "TooManyRequests"
    assert len(sleeps) == 2 and len(graph_standin.requests) == 3


def test_wrong_token_is_401_and_not_retried_forever(graph_standin):
    with pytest.raises(GraphError) as caught:
        run(read_users(GraphClient(graph_standin.base_url, StaticToken("wrong")), NOW))
    assert caught.value.status == 401 and caught.value.code == "InvalidAuthenticationToken"
    assert [r.status for r in graph_standin.requests] == [401, 401]  # one fresh token, then stop


def test_bad_request_is_not_retried(graph_standin):
    async def main():
        graph = client(graph_standin)
        try:
            await graph.get_json(f"{graph_standin.base_url}/v1.0/users?$top=1000")
        finally:
            await graph.close()

    with pytest.raises(GraphError, match="Invalid page size") as caught:
        run(main())
    assert caught.value.status == 400 and len(graph_standin.requests) == 1


def test_next_link_to_another_origin_is_refused_before_sending_the_token(graph_standin):
    async def main():
        graph = client(graph_standin)
        try:
            await graph.get_json("https://evil.example/v1.0/users")
        finally:
            await graph.close()

    with pytest.raises(GraphError, match="another origin"):
        run(main())
    assert graph_standin.requests == []


def test_unreachable_graph_is_retried_then_reported():
    sleeps = Sleeps()
    with GraphStandIn() as standin:
        base = standin.base_url
    graph = GraphClient(base, StaticToken("t"), sleep=sleeps, max_attempts=3)
    with pytest.raises(GraphError) as caught:
        run(read_users(graph, NOW))
    assert caught.value.status == 0 and len(sleeps) == 2


def test_group_transitive_members_paged(graph_standin):
    graph_standin.page_limit = 2
    users = [graph_standin.add_user(mail=f"u{n}@contoso.com")["id"] for n in range(5)]
    graph_standin.set_group("outer", [users[0], users[1], "inner"])
    graph_standin.set_group("inner", [users[2], users[3], "outer"])  # a cycle must not loop

    async def main():
        graph = client(graph_standin)
        try:
            return await graph.group_member_ids("outer")
        finally:
            await graph.close()

    assert run(main()) == frozenset(users[:4])
    paths = {r.path for r in graph_standin.requests}
    assert paths == {"/v1.0/groups/outer/transitiveMembers/microsoft.graph.user"}
    assert len(graph_standin.requests) == 2


def test_unknown_group_is_404(graph_standin):
    async def main():
        graph = client(graph_standin)
        try:
            return await graph.group_member_ids("nope")
        finally:
            await graph.close()

    with pytest.raises(GraphError) as caught:
        run(main())
    assert caught.value.status == 404 and caught.value.code == "Request_ResourceNotFound"


# --- pieces without a peer -------------------------------------------------------------------------

def test_https_required_except_loopback():
    assert check_base_url("https://graph.microsoft.com/") == "https://graph.microsoft.com"
    assert check_base_url("http://127.0.0.1:8484") == "http://127.0.0.1:8484"
    assert check_base_url("http://localhost:8484") == "http://localhost:8484"
    for bad in ("http://graph.microsoft.com", "ftp://x", "graph.microsoft.com", "http://10.0.0.1"):
        with pytest.raises(SettingsError, match="GRAPH_BASE_URL"):
            check_base_url(bad)


def test_scope_follows_the_graph_cloud():
    assert graph_scope("https://graph.microsoft.com") == "https://graph.microsoft.com/.default"
    assert graph_scope("https://graph.microsoft.us") == "https://graph.microsoft.us/.default"


def test_dev_token_only_for_a_loopback_graph():
    local = Settings.from_env({"GRAPH_BASE_URL": "http://127.0.0.1:9", "GRAPH_DEV_TOKEN": "dev"})
    assert isinstance(graph_credential(local), StaticToken)
    with pytest.raises(SettingsError, match="GRAPH_DEV_TOKEN"):
        graph_credential(Settings.from_env({"GRAPH_DEV_TOKEN": "dev"}))
    assert "dev" not in repr(local)


def test_retry_after_forms_and_backoff_cap():
    assert retry_after_seconds("7") == 7.0
    assert retry_after_seconds(None) is None and retry_after_seconds("soon") is None
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
    assert [backoff_seconds(n, 1.0, 8.0, rng=lambda: 1.0) for n in range(1, 7)] == [1, 2, 4, 8, 8, 8]
    assert backoff_seconds(3, 1.0, 8.0, rng=lambda: 0.0) == 2.0
