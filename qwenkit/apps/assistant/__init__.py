"""The assistant: a tool-using Qwen agent for devices (directions, places, weather, web search, drafts, MCP tools).

    from qwenkit.apps.assistant import Agent, open_chat, builtin_tools, services_from_env
    agent = Agent(open_chat("qwen2.5-coder:0.5b"), builtin_tools(services_from_env(), drafts=[]))
    print(agent.ask("How do I walk from the Brandenburg Gate to Alexanderplatz?").answer)
"""

from typing import TYPE_CHECKING

from qwenkit._lazy import lazy_exports

__all__ = ["Agent", "AgentResult", "Event", "Service", "Tool", "ToolError", "builtin_tools", "open_chat",
           "services_from_env"]

__getattr__ = lazy_exports("qwenkit.apps.assistant", {
    "Agent": "qwenkit.apps.assistant.agent", "AgentResult": "qwenkit.apps.assistant.agent",
    "Event": "qwenkit.apps.assistant.agent", "Service": "qwenkit.apps.assistant.services",
    "services_from_env": "qwenkit.apps.assistant.services", "Tool": "qwenkit.apps.assistant.tool",
    "ToolError": "qwenkit.apps.assistant.tool", "builtin_tools": "qwenkit.apps.assistant.builtin",
    "open_chat": "qwenkit.apps.backend",
})

if TYPE_CHECKING:
    from qwenkit.apps.assistant.agent import Agent, AgentResult, Event
    from qwenkit.apps.backend import open_chat
    from qwenkit.apps.assistant.builtin import builtin_tools
    from qwenkit.apps.assistant.services import Service, services_from_env
    from qwenkit.apps.assistant.tool import Tool, ToolError
