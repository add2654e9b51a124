"""``kvsync.Client``: a synchronous client of ``kvsync serve``'s HTTP API
(one method per endpoint, docs/service.md). Any answer other than 2xx
raises ``kvsync.ServiceError`` carrying the status and the server's
message; a server that cannot be reached raises it with ``status=None``."""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import Any

import httpx
import msgspec

from kvsync._core import Error

__all__ = ["Client", "ServiceError"]

_encode = msgspec.json.Encoder().encode


class ServiceError(Error):
    """A request to ``kvsync serve`` failed: ``status`` (None when the
    server could not be reached) and the server's ``message``."""

    def __init__(self, status: int | None, message: str) -> None:
        super().__init__(f"{status}: {message}" if status is not None else message)
        self.status = status
        self.message = message

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.status, self.message))


def _drop_none(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if v is not None}


class Client:
    """``Client("http://127.0.0.1:8080", token=None, timeout=10.0)``; use it
    as a context manager or call ``close()``."""

    def __init__(self, base_url: str, token: str | None = None, timeout: float = 10.0) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ------------------------------------------------------------ plumbing

    def _request(
        self, method: str, path: str, body: dict[str, Any] | None = None
    ) -> httpx.Response:
        try:
            if body is None:
                resp = self._http.request(method, path)
            else:
                resp = self._http.request(
                    method,
                    path,
                    content=_encode(body),
                    headers={"Content-Type": "application/json"},
                )
        except httpx.HTTPError as e:
            raise ServiceError(None, f"{method} {self.base_url}{path}: {e}") from e
        if resp.status_code >= 300:
            try:
                message = str(resp.json().get("error", resp.text))
            except ValueError:
                message = resp.text or resp.reason_phrase
            raise ServiceError(resp.status_code, message)
        return resp

    def _json(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        return msgspec.json.decode(self._request(method, path, body).content)

    # ------------------------------------------------------ Mooncake API

    def register(
        self,
        endpoint: str,
        modelname: str,
        instance_id: str,
        block_size: int,
        *,
        dp_rank: int = 0,
        type: str = "vLLM",
        replay_endpoint: str | None = None,
        lora_name: str | None = None,
        tenant_id: str | None = None,
    ) -> dict[str, Any]:
        body = _drop_none(
            {
                "endpoint": endpoint,
                "modelname": modelname,
                "instance_id": instance_id,
                "block_size": block_size,
                "dp_rank": dp_rank,
                "type": type,
                "replay_endpoint": replay_endpoint,
                "lora_name": lora_name,
                "tenant_id": tenant_id,
            }
        )
        result: dict[str, Any] = self._json("POST", "/register", body)
        return result

    def unregister(
        self, instance_id: str, *, tenant_id: str | None = None, dp_rank: int | None = None
    ) -> dict[str, Any]:
        body = _drop_none({"instance_id": instance_id, "tenant_id": tenant_id, "dp_rank": dp_rank})
        result: dict[str, Any] = self._json("POST", "/unregister", body)
        return result

    def query(
        self,
        model: str,
        token_ids: Sequence[int],
        *,
        lora_name: str | None = None,
        tenant_id: str | None = None,
        instance_id: str | None = None,
        block_size: int | None = None,
        cache_salt: str | None = None,
    ) -> dict[str, dict[str, dict[str, Any]]]:
        body = _drop_none(
            {
                "model": model,
                "token_ids": list(token_ids),
                "lora_name": lora_name,
                "tenant_id": tenant_id,
                "instance_id": instance_id,
                "block_size": block_size,
                "cache_salt": cache_salt,
            }
        )
        result: dict[str, dict[str, dict[str, Any]]] = self._json("POST", "/query", body)
        return result

    def query_by_hash(
        self,
        model: str,
        seq_hashes: Sequence[int],
        *,
        lora_name: str | None = None,
        tenant_id: str | None = None,
        instance_id: str | None = None,
    ) -> dict[str, dict[str, dict[str, Any]]]:
        body = _drop_none(
            {
                "model": model,
                "seq_hashes": list(seq_hashes),
                "lora_name": lora_name,
                "tenant_id": tenant_id,
                "instance_id": instance_id,
            }
        )
        result: dict[str, dict[str, dict[str, Any]]] = self._json("POST", "/query_by_hash", body)
        return result

    # -------------------------------------------------------- kvsync API

    def route(
        self,
        model: str,
        token_ids: Sequence[int],
        *,
        lora_name: str | None = None,
        extra_keys: Sequence[Sequence[Any] | None] | None = None,
        candidates: Sequence[str] | None = None,
        policy: str | None = None,
        request_id: str | None = None,
    ) -> dict[str, Any]:
        body = _drop_none(
            {
                "model": model,
                "token_ids": list(token_ids),
                "lora_name": lora_name,
                "extra_keys": None
                if extra_keys is None
                else [None if k is None else list(k) for k in extra_keys],
                "candidates": None if candidates is None else list(candidates),
                "policy": policy,
                "request_id": request_id,
            }
        )
        result: dict[str, Any] = self._json("POST", "/v1/route", body)
        return result

    def release(self, request_id: str) -> bool:
        return bool(self._json("POST", "/v1/release", {"request_id": request_id})["released"])

    def workers(self) -> dict[str, dict[str, Any]]:
        result: dict[str, dict[str, Any]] = self._json("GET", "/v1/workers")
        return result

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = self._json("GET", "/v1/stats")
        return result

    def snapshot(self) -> bytes:
        """The index snapshot (``Index.load`` reads it from a file)."""
        return self._request("GET", "/v1/snapshot").content

    def save_snapshot(self) -> dict[str, Any]:
        """Make the server save its snapshot now: ``{path, bytes, seconds}``."""
        result: dict[str, Any] = self._json("POST", "/v1/snapshot")
        return result

    def healthz(self) -> dict[str, Any]:
        result: dict[str, Any] = self._json("GET", "/healthz")
        return result

    def readyz(self) -> dict[str, Any]:
        """``{"status": "ready"}``; raises ``ServiceError`` (503, the reasons)
        while the server is not ready."""
        result: dict[str, Any] = self._json("GET", "/readyz")
        return result

    def metrics(self) -> str:
        return self._request("GET", "/metrics").text

    def openapi(self) -> dict[str, Any]:
        result: dict[str, Any] = self._json("GET", "/openapi.json")
        return result
