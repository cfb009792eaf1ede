"""`GET /v1/generations` across several servers: each server's newest page (with the caller's credential, so
each shows only what the caller may see), merged newest first.

The cursor holds where each server's list goes on, joined by "_": the id of the last task shown from it, or
`<server>.newest` while none of its tasks has been shown yet. A server missing from the cursor has
nothing more to show. Ids never contain "_", and each names its server. A server that does not answer is
named in the page's `unreachable`, and its part of the list is asked for again with the next page, if
there is one.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import anyio
import httpx
import msgspec
from starlette.types import Scope

from forge.nodes import BARE_TASK_ID, node_of
from protocols.peers import PEER_TIMEOUT, Peers, PeerUnreachable, relay_headers
from protocols.views import API, ListQuery, TaskList, TaskView

log = logging.getLogger(__name__)

FROM_NEWEST = ".newest"
# One server's page: newest first, after the task with this id (None: from its newest).
LocalPage = Callable[[str | None], Awaitable[list[TaskView]]]


def cursor_positions(cursor: str, servers: list[str]) -> dict[str, str | None]:
    """Where each listed server goes on: after a task id, or None for its newest. Unknown servers are skipped."""
    positions: dict[str, str | None] = {}
    for token in cursor.split("_"):
        if token.endswith(FROM_NEWEST):
            node, after = token.removesuffix(FROM_NEWEST), None
        else:
            node, after = ("" if BARE_TASK_ID.match(token) else node_of(token) or ""), token  # "": no node id
        if node in servers:
            positions[node] = after
    return positions


def _place(node: str, after: str | None) -> str:
    return after or node + FROM_NEWEST


async def fleet_page(query: ListQuery, here: LocalPage, peers: Peers, scope: Scope) -> TaskList:
    servers = [peers.node_id, *peers.others]
    positions = {node: None for node in servers} if query.cursor is None else cursor_positions(query.cursor, servers)
    pages: dict[str, list[TaskView]] = {}
    silent: list[str] = []

    async def fetch(node: str, after: str | None) -> None:
        if node == peers.node_id:
            pages[node] = await here(after)
            return
        try:
            pages[node] = await _peer_page(peers.others[node], query, after, scope, peers.node_id)
        except PeerUnreachable as exc:  # listed without it, and asked again for the next page
            log.warning("listing without server %s: %s", node, exc.message)
            silent.append(node)

    async with anyio.create_task_group() as requests:
        for node, after in positions.items():
            requests.start_soon(fetch, node, after)

    shown = sorted(
        ((view, node) for node, views in pages.items() for view in views),
        key=lambda pair: (pair[0].created_at, pair[0].id),
        reverse=True,
    )[: query.limit]
    goes_on = []
    for node, views in pages.items():
        from_here = [view for view, source in shown if source == node]
        if len(from_here) < len(views) or len(views) == query.limit:  # it may have more
            goes_on.append(_place(node, from_here[-1].id if from_here else positions[node]))
    if goes_on:  # the silent ones are asked again with the next page; a last page does not wait for them
        goes_on += [_place(node, positions[node]) for node in silent]
    return TaskList(items=[view for view, _ in shown], next_cursor="_".join(goes_on) or None, unreachable=silent)


async def _peer_page(base_url: str, query: ListQuery, after: str | None, scope: Scope, node_id: str) -> list[TaskView]:
    params = {"limit": str(query.limit)}
    if query.state is not None:
        params["state"] = query.state
    if after is not None:
        params["cursor"] = after
    headers = relay_headers(scope, node_id)
    try:
        async with httpx.AsyncClient(timeout=PEER_TIMEOUT) as client:
            response = await client.get(base_url + API, params=params, headers=headers)
    except httpx.TransportError as exc:
        raise PeerUnreachable(f"the server at {base_url} did not answer: {exc}") from None
    if response.status_code != 200:
        raise PeerUnreachable(f"the server at {base_url} answered {response.status_code}: {response.text}")
    return msgspec.json.decode(response.content, type=TaskList).items
