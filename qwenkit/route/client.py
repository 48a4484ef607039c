"""qwenkit.Client: the router in-process, behind a small synchronous API, for apps that embed qwenkit.

    client = qwenkit.Client("route.yaml")            # or Client(RouteConfig) / Client(Router)
    reply = client.chat([{"role": "user", "content": "hi"}], temperature=0)
    print(reply["choices"][0]["message"]["content"], reply["qwenkit_backends"])
    for chunk in client.chat(messages, stream=True): ...
    client.close()

The router (its HTTP clients, probes and the on-device model's engine) runs on an event loop in a background
thread, so the same failover — before the first token and mid-stream — applies to calls from plain blocking code.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from qwenkit.route.config import RouteConfig
from qwenkit.route.router import Router


class Client:
    def __init__(self, route: str | Path | RouteConfig | Router):
        if isinstance(route, Router):
            self.router = route
        elif isinstance(route, RouteConfig):
            self.router = Router(route)
        else:
            self.router = Router.from_file(str(route))
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="qwenkit-client", daemon=True)
        self._thread.start()
        self._call(self.router.start())

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def chat(self, messages: list[dict], *, model: str | None = None, stream: bool = False,
             **params: Any) -> dict | Iterator[dict]:
        """An OpenAI chat.completion dict, or with stream=True an iterator of chat.completion.chunk dicts (the last
        one carries `qwenkit_backends`). Other keyword arguments are request fields (temperature, max_tokens...)."""
        body = {"messages": messages, **params}
        if model is not None:
            body["model"] = model
        if not stream:
            result, _ = self._call(self.router.complete(body))
            return result
        return self._iterate(body)

    def _iterate(self, body: dict) -> Iterator[dict]:
        s = self.router.stream(body)
        it = s.__aiter__()
        try:
            while True:
                try:
                    yield self._call(it.__anext__())
                except StopAsyncIteration:
                    return
        finally:  # the caller stopped early (or failed): close the backend stream on the loop
            self._call(s.aclose())

    def probe(self) -> None:
        """Probe every remote backend now (the background probes do this every probe_interval)."""
        self._call(self.router.probe_once())

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._call(self.router.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
