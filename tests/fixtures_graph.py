"""pytest plugin: a Graph stand-in (tools.graph_standin) over real HTTP on 127.0.0.1, per test.

- graph_standin: a fresh, empty, started GraphStandIn (users, groups, faults, request log are the
  test's own); stopped at test end. `.base_url` and `.token` go to GRAPH_BASE_URL/GRAPH_DEV_TOKEN.
- graph_env(graph_standin, **more): the app settings pointing the app at it.

Starting one takes a few milliseconds, so each test gets its own.
"""

from __future__ import annotations

from typing import Iterator

import pytest

from tools.graph_standin import GraphStandIn


def graph_env(standin: GraphStandIn, **more: str) -> dict[str, str]:
    return {"GRAPH_BASE_URL": standin.base_url, "GRAPH_DEV_TOKEN": standin.token or "", **more}


@pytest.fixture
def graph_standin() -> Iterator[GraphStandIn]:
    with GraphStandIn() as standin:
        yield standin
