"""The admin API over HTTP, for operators who are not Ray drivers (`serve-canary --url`).

The same commands as `ControllerClient`, sent to the ingress's admin routes with the admin
bearer token; the routes call the one `ControllerClient`, so both paths make the same moves.
"""

from __future__ import annotations

import httpx
from pydantic import TypeAdapter

from serve_canary.rollout import Event, TransitionError
from serve_canary.status import RolloutStatus


class AdminRefused(Exception):
    """The server refused the call (no or wrong token, admin API off, not found)."""


class HttpControllerClient:
    def __init__(self, url: str, token: str | None, timeout_s: float = 30.0) -> None:
        headers = {"authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.AsyncClient(base_url=url.rstrip("/") + "/-/canary", headers=headers, timeout=timeout_s)

    async def _call(self, method: str, path: str, body: dict[str, float] | None = None) -> RolloutStatus:
        response = await self._http.request(method, path, json=body)
        if response.status_code == 409:
            raise TransitionError(_message(response))
        if response.is_error:
            raise AdminRefused(f"{response.status_code} from {response.url}: {_message(response)}")
        return RolloutStatus.model_validate_json(response.content)

    async def status(self) -> RolloutStatus:
        return await self._call("GET", "/status")

    async def history(self) -> tuple[Event, ...]:
        response = await self._http.get("/history")
        if response.is_error:
            raise AdminRefused(f"{response.status_code} from {response.url}: {_message(response)}")
        return TypeAdapter(tuple[Event, ...]).validate_json(response.content)

    async def pause(self) -> RolloutStatus:
        return await self._call("POST", "/pause")

    async def resume(self) -> RolloutStatus:
        return await self._call("POST", "/resume")

    async def approve(self) -> RolloutStatus:
        return await self._call("POST", "/approve")

    async def rollback(self) -> RolloutStatus:
        return await self._call("POST", "/rollback")

    async def restart(self) -> RolloutStatus:
        return await self._call("POST", "/restart")

    async def set_weight(self, weight: float) -> RolloutStatus:
        return await self._call("PUT", "/weight", {"weight": weight})


def _message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:200]
