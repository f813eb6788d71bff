"""What every served engine shares: one HTTP client, its timeouts and retries, and faults as one-line errors.

A served engine (llama-server, Ollama, vLLM...) is reached at an endpoint; stacklock never starts it. The
``httpx.Client`` is injected (tests and users configure proxies, certificates, transports), and every fault
(refused, reset, timeout, 5xx after retries, 401/403, a body that is not the JSON asked for) becomes an
:class:`~stacklock.errors.EngineError` that says what was asked of which endpoint, in one line: exit 3.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx

from stacklock.errors import EngineError, NotFoundError

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = ["DEFAULT_TIMEOUT", "ServedClient", "ServedSettings"]

#: Seconds for one request: connecting, and waiting for a whole completion. Never unbounded, so CI never hangs.
DEFAULT_TIMEOUT = 120.0
_CONNECT_TIMEOUT = 10.0
#: 5xx answers and dropped connections are retried this many times, waiting 0.5 s, 1 s, 2 s...
DEFAULT_RETRIES = 3
_BACKOFF = 0.5
_RETRIED_STATUS = frozenset({500, 502, 503, 504})
#: The most of a response body an error message quotes.
_QUOTE = 160


@dataclass(frozen=True)
class ServedSettings:
    """Where a served engine is and how to talk to it."""

    endpoint: str
    api_key_env: str | None = None
    timeout: float = DEFAULT_TIMEOUT
    #: The served model's name (engine.model), for engines that serve several; None: the one it serves.
    model: str | None = None
    retries: int = DEFAULT_RETRIES


class ServedClient:
    """JSON over HTTP to one endpoint; each fault is one :class:`EngineError` line naming the endpoint."""

    def __init__(self, engine: str, settings: ServedSettings, client: httpx.Client | None = None) -> None:
        self.engine = engine
        self.settings = settings
        self.endpoint = settings.endpoint.rstrip("/")
        if not self.endpoint.startswith(("http://", "https://")):
            raise EngineError(
                f"{engine}: endpoint {settings.endpoint!r} is not an http:// or https:// URL",
                hint="set engine.endpoint in llmstack.toml or pass --endpoint http://HOST:PORT",
            )
        headers = {}
        if settings.api_key_env:
            key = os.environ.get(settings.api_key_env)
            if not key:
                raise EngineError(
                    f"{engine}: the API key variable {settings.api_key_env} is not set",
                    hint=f"export {settings.api_key_env}=... (engine.api-key-env names it in llmstack.toml)",
                )
            headers["Authorization"] = f"Bearer {key}"
        self._owned = client is None
        self._client = client or httpx.Client(
            timeout=httpx.Timeout(settings.timeout, connect=min(_CONNECT_TIMEOUT, settings.timeout))
        )
        self._headers = headers

    @classmethod
    def for_adapter(
        cls, engine: str, settings: ServedSettings | None, client: httpx.Client | None = None
    ) -> ServedClient:
        """The client of a served adapter; an adapter constructed without settings has no endpoint to reach."""
        if settings is None:
            raise EngineError(
                f"{engine} is a served engine and needs an endpoint",
                hint="set engine.endpoint in llmstack.toml or pass --endpoint http://HOST:PORT",
            )
        return cls(engine, settings, client)

    def get(self, path: str) -> Any:
        return self._request("GET", path, None)

    def post(self, path: str, body: Mapping[str, Any]) -> Any:
        return self._request("POST", path, body)

    def _request(self, method: str, path: str, body: Mapping[str, Any] | None) -> Any:
        url = f"{self.endpoint}{path}"
        what = f"{self.engine} at {self.endpoint}: {method} {path}"
        for attempt in range(self.settings.retries + 1):
            last = attempt == self.settings.retries
            try:
                response = self._client.request(method, url, json=body, headers=self._headers)
            except httpx.TimeoutException as exc:
                raise EngineError(
                    f"{what} timed out ({type(exc).__name__}, limit {self.settings.timeout:g} s)",
                    hint="check that the server is up and not overloaded, or raise STACKLOCK_TIMEOUT (seconds)",
                ) from exc
            except httpx.TransportError as exc:
                if last:
                    raise EngineError(
                        f"{what} failed: {_transport_reason(exc)}",
                        hint="start the server, or point --endpoint (engine.endpoint) at the one that runs",
                    ) from exc
            else:
                if response.status_code not in _RETRIED_STATUS or last:
                    return self._decode(what, response)
            time.sleep(_BACKOFF * 2**attempt)
        msg = "unreachable: the last attempt returns or raises"  # pragma: no cover
        raise AssertionError(msg)  # pragma: no cover

    def _decode(self, what: str, response: httpx.Response) -> Any:
        status = response.status_code
        if status in {401, 403}:
            variable = self.settings.api_key_env
            hint = (
                f"check the key in {variable}"
                if variable
                else "the server wants an API key: name its variable in engine.api-key-env"
            )
            raise EngineError(f"{what} was refused with HTTP {status}", hint=hint)
        if status >= 400:
            # A 404 is its own class, so an adapter can name what is missing (Ollama: a model not pulled).
            error = NotFoundError if status == 404 else EngineError
            raise error(
                f"{what} answered HTTP {status}: {_quote(response.text)}",
                hint="check the server's log; a model that is not loaded answers 503 or 404",
            )
        try:
            return response.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise EngineError(
                f"{what} answered with a body that is not JSON: {_quote(response.text)}",
                hint="check that the endpoint is the engine's server and not a proxy or another service",
            ) from exc

    def close(self) -> None:
        if self._owned:
            self._client.close()


def _transport_reason(exc: httpx.TransportError) -> str:
    if isinstance(exc, httpx.ConnectError):
        return f"cannot connect ({exc})"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _quote(text: str) -> str:
    flat = " ".join(text.split())
    return repr(flat[:_QUOTE] + ("..." if len(flat) > _QUOTE else ""))


def field(what: str, data: Any, *path: str | int) -> Any:
    """A value deep in a JSON answer; a missing or mistyped key is one EngineError line naming its path."""
    value = data
    for key in path:
        try:
            value = value[key]
        except (KeyError, IndexError, TypeError):
            where = "".join(f"[{k!r}]" for k in path)
            raise EngineError(
                f"{what}: the answer has no {where}",
                hint="this server version answers in another shape; check engine.version in llmstack.toml",
            ) from None
    return value
