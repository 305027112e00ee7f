"""Booleans in ``vllm_xargs`` stay booleans: an ASGI middleware for ``vllm serve``.

vLLM's request models type ``vllm_xargs`` values as ``str | int | float | list[...]``; pydantic's
smart union turns a JSON ``true`` into the integer ``1`` before any plugin code runs, so
``{"kv_window": true}`` would reach admission as a legal ``kv_window: 1``. The routes' validators
are compiled when vLLM imports its routers (before plugins load), so the models cannot be
changed in time; instead this middleware, which ``vllm serve`` installs through its own
``--middleware`` option (added by the plugin's ``from_cli_args`` wrapper), reads the raw JSON of
requests that carry ``vllm_xargs`` and answers HTTP 400 for a boolean in a ``kv_*`` key, naming
it, in vLLM's error format. Other requests pass untouched (the body is replayed as received).

Offline ``SamplingParams(extra_args=...)`` needs none of this: admission sees the Python values.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from .config import REQUEST_PREFIX, CompressionConfigError, _shown
from .policies.registry import all_params

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

#: The import path ``vllm serve --middleware`` receives.
MIDDLEWARE_PATH = "vllm_kvcompress.strict_xargs.StrictXargsMiddleware"


def boolean_error(body: bytes) -> CompressionConfigError | None:
    """The error for the first ``kv_*`` key of ``vllm_xargs`` that holds a boolean (alone or in
    a list), or ``None`` (not JSON, no ``vllm_xargs``, no boolean: vLLM and admission judge)."""
    if b'"vllm_xargs"' not in body or REQUEST_PREFIX.encode() not in body:
        return None
    try:
        data = json.loads(body)
    except ValueError:
        return None
    xargs = data.get("vllm_xargs") if isinstance(data, dict) else None
    if not isinstance(xargs, dict):
        return None
    params = all_params()
    for key, value in xargs.items():
        items = value if isinstance(value, list) else [value]
        if not (isinstance(key, str) and key.startswith(REQUEST_PREFIX)
                and any(isinstance(item, bool) for item in items)):
            continue
        param = params.get(key[len(REQUEST_PREFIX):])
        allowed = param.allowed() if param is not None else "a known kv_* key"
        return CompressionConfigError(_shown(key).strip("'\""),
                                      f"must be {allowed} (got {_shown(value)})")
    return None


class StrictXargsMiddleware:
    """Pure ASGI middleware: buffers a POST body, refuses booleans in ``kv_*`` keys, replays
    the body otherwise (later ``receive`` calls, e.g. a client's disconnect, pass through)."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") != "http" or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        first: Message | None = None
        while True:
            message = await receive()
            if message.get("type") != "http.request":
                first = message  # a disconnect before the body ended: let the app see it
                break
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        error = boolean_error(body) if first is None else None
        if error is not None:
            await _send_error(send, error)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                if first is not None:
                    return first
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _send_error(send: Send, error: CompressionConfigError) -> None:
    payload = json.dumps({"error": {"message": str(error), "type": "BadRequestError",
                                    "param": f"vllm_xargs.{error.field}", "code": 400}}).encode()
    await send({"type": "http.response.start", "status": 400,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})


def install(args: Any) -> None:
    """Adds the middleware to a ``vllm serve`` namespace (once; no-op for other commands)."""
    middleware = getattr(args, "middleware", None)
    if isinstance(middleware, list) and MIDDLEWARE_PATH not in middleware:
        args.middleware = [*middleware, MIDDLEWARE_PATH]  # a new list: never argparse's default
