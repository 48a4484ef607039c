"""Tools from Model Context Protocol servers, through the official `mcp` SDK: a command run over stdio, or a
streamable HTTP endpoint. Each connection stays open on its own event loop thread, so the agent's blocking,
parallel tool calls can use it.

Safety: a tool whose annotations do not say it is read-only may change the world, so it requires confirmation.
"""

from __future__ import annotations

import asyncio
import shlex
import threading
from typing import Any

from qwenkit.apps.assistant.tool import Tool, ToolError
from qwenkit.errors import QwenkitError


class MCPConnection:
    def __init__(self, target: str, *, env: dict[str, str] | None = None, timeout: float = 30.0,
                 connect_timeout: float = 20.0):
        """target: an http(s) URL (streamable HTTP) or a command line that starts a stdio server. env: variables
        for a stdio server (the SDK passes it only a minimal environment, not ours)."""
        self.target, self.env, self.timeout, self.connect_timeout = target, env, timeout, connect_timeout
        self.label = target if len(target) <= 60 else target[:57] + "..."
        self._loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        self._client: Any = None
        self._stop: asyncio.Event | None = None
        self._done: asyncio.Future | None = None

    def _server(self) -> Any:
        if self.target.startswith(("http://", "https://")):
            return self.target
        from mcp import StdioServerParameters

        argv = shlex.split(self.target)
        if not argv:
            raise QwenkitError("an MCP server command is empty")
        return StdioServerParameters(command=argv[0], args=argv[1:], env=self.env)

    async def _hold(self, ready: asyncio.Future) -> None:
        try:
            from mcp import Client

            async with Client(self._server(), read_timeout_seconds=self.timeout) as client:
                self._client, self._stop = client, asyncio.Event()
                ready.set_result(None)
                await self._stop.wait()
        except BaseException as e:  # noqa: BLE001 (reported to the caller of start)
            if not ready.done():
                ready.set_exception(e)
            elif not isinstance(e, (asyncio.CancelledError, GeneratorExit)):
                raise

    def start(self) -> MCPConnection:
        self._thread = threading.Thread(target=self._loop.run_forever, name="qwenkit-mcp", daemon=True)
        self._thread.start()

        async def begin() -> None:
            ready = self._loop.create_future()
            self._done = asyncio.ensure_future(self._hold(ready))
            await asyncio.wait_for(ready, self.connect_timeout)

        try:
            self._call(begin(), self.connect_timeout + 1)
        except Exception as e:
            self.close()
            raise QwenkitError(f"cannot connect to MCP server {self.label}: {_reason(e)}") from None
        return self

    def _call(self, coro: Any, timeout: float) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def tools(self, taken: set[str] = frozenset()) -> list[Tool]:
        """The server's tools as agent tools (a name already taken gets the server's name as a prefix)."""
        listed = self._call(self._client.list_tools(), self.timeout)
        out = []
        for t in listed.tools:
            name = t.name if t.name not in taken else f"mcp_{t.name}"
            read_only = bool(t.annotations and t.annotations.read_only_hint)
            out.append(Tool(name=name, description=t.description or t.name,
                            parameters=t.input_schema or {"type": "object", "properties": {}},
                            run=self._runner(t.name), acts_on_world=not read_only, source=f"mcp:{self.label}"))
        return out

    def _runner(self, remote_name: str):
        def run(arguments: dict[str, Any]) -> str:
            try:
                result = self._call(self._client.call_tool(remote_name, arguments), self.timeout)
            except TimeoutError:
                raise ToolError(f"MCP server {self.label} did not answer {remote_name} within {self.timeout:g} s")
            except Exception as e:
                raise ToolError(f"MCP server {self.label} failed on {remote_name}: {_reason(e)}") from None
            text = _content_text(result)
            if result.is_error:
                raise ToolError(f"{remote_name} (MCP server {self.label}) reported an error: {text}")
            return text

        return run

    def close(self) -> None:
        if self._loop.is_closed():
            return
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
            if self._done is not None:
                try:
                    self._call(asyncio.wait_for(asyncio.shield(self._done), 10), 11)
                except Exception:  # noqa: BLE001 (closing: the server may already be gone)
                    pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)
        self._loop.close()


def _content_text(result: Any) -> str:
    parts = []
    for block in result.content or []:
        kind = getattr(block, "type", "")
        if kind == "text":
            parts.append(block.text)
        elif kind == "resource_link" or kind == "resource":
            parts.append(f"[resource {getattr(block, 'uri', '') or getattr(block.resource, 'uri', '')}]")
        else:
            parts.append(f"[{kind} content]")
    if not parts and result.structured_content is not None:
        import json

        parts.append(json.dumps(result.structured_content, ensure_ascii=False))
    return "\n".join(parts)


def _reason(e: BaseException) -> str:
    while isinstance(e, BaseExceptionGroup) and e.exceptions:
        e = e.exceptions[0]
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
