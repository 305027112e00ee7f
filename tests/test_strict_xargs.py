"""JSON booleans in kv_* keys are refused before vLLM's request models coerce them (pure ASGI,
no server): the middleware's decision and its body replay."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from vllm_kvcompress.strict_xargs import (
    MIDDLEWARE_PATH,
    StrictXargsMiddleware,
    boolean_error,
    install,
)


def test_boolean_error_names_the_key() -> None:
    body = json.dumps({"prompt": "hi", "vllm_xargs": {"kv_window": True}}).encode()
    error = boolean_error(body)
    assert error is not None and error.field == "kv_window"
    assert str(error).startswith("kv_window: must be an integer >= 1")
    assert "(got True)" in str(error)
    listed = boolean_error(json.dumps({"vllm_xargs": {"kv_ratio": [0.5, False]}}).encode())
    assert listed is not None and listed.field == "kv_ratio"
    for fine in ({"vllm_xargs": {"kv_window": 1, "other": True}}, {"vllm_xargs": "x"},
                 {"kv_window": True}, [1, 2]):
        assert boolean_error(json.dumps(fine).encode()) is None, fine
    assert boolean_error(b'{"vllm_xargs": {"kv_window": tru') is None  # vLLM's own 400


def run(body: bytes, chunks: int = 1) -> tuple[list[dict[str, Any]], list[bytes]]:
    """Sends ``body`` through the middleware in ``chunks`` parts; returns what the client got
    and what the app read."""
    seen: list[bytes] = []
    sent: list[dict[str, Any]] = []
    parts = [body[i * len(body) // chunks:(i + 1) * len(body) // chunks] for i in range(chunks)]
    incoming = [{"type": "http.request", "body": p, "more_body": i < len(parts) - 1}
                for i, p in enumerate(parts)] + [{"type": "http.disconnect"}]

    async def receive() -> dict[str, Any]:
        return incoming.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        message = await receive()
        seen.append(message["body"])
        assert (await receive())["type"] == "http.disconnect"  # later receives pass through
        await send({"type": "http.response.start", "status": 200, "headers": []})

    asyncio.run(StrictXargsMiddleware(app)({"type": "http", "method": "POST"}, receive, send))
    return sent, seen


def test_middleware_refuses_booleans_and_replays_everything_else() -> None:
    bad = json.dumps({"prompt": "x", "vllm_xargs": {"kv_budget": False}}).encode()
    sent, seen = run(bad)
    assert sent[0]["status"] == 400 and not seen
    error = json.loads(sent[1]["body"])["error"]
    assert error["param"] == "vllm_xargs.kv_budget" and error["code"] == 400
    good = json.dumps({"prompt": "y" * 5000, "vllm_xargs": {"kv_budget": 10}}).encode()
    sent, seen = run(good, chunks=3)
    assert sent[0]["status"] == 200 and seen == [good]


def test_install_adds_the_middleware_once_to_serve_namespaces_only() -> None:
    from argparse import Namespace

    default: list[str] = []
    args = Namespace(middleware=default)
    install(args)
    install(args)
    assert args.middleware == [MIDDLEWARE_PATH] and default == []
    other = Namespace()
    install(other)
    assert not hasattr(other, "middleware")
