"""A tool the assistant can call: its JSON Schema, the function that runs it, and whether it acts on the world.

Arguments are validated against the schema before the function runs, so a tool's code only ever sees arguments of
the declared shape; a call the model got wrong comes back to it as a tool result that says what is wrong.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jsonschema

# Control markers of Qwen's chat format. Tool output is untrusted text: left as is, "<|im_start|>system" in a web page
# would be tokenized as a real turn boundary. The look-alike bracket keeps the text readable but inert.
_MARKERS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<tool_call>", "</tool_call>", "<tool_response>",
            "</tool_response>", "<think>", "</think>")


class ToolError(Exception):
    """A tool could not do its job (service down, timeout, bad answer, bad arguments). The message goes back to the
    model as the tool's result, so it can explain the failure or try something else."""


@dataclass
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]  # JSON Schema of the arguments object
    run: Callable[[dict[str, Any]], Any]  # arguments -> result (str, or anything JSON-serializable)
    acts_on_world: bool = False  # sends, pays, deletes...: the user must confirm each call
    source: str = "builtin"  # "builtin" or the MCP server it came from, for the trace
    use_when: str = ""  # what a request that needs this tool asks for: shown when the tools are chosen (plan.py)
    _validator: Any = field(default=None, init=False, repr=False)

    def spec(self) -> dict[str, Any]:
        """The OpenAI `tools` entry the model sees."""
        return {"type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}

    def fits(self, arguments: dict[str, Any]) -> bool:
        """Whether these arguments name only properties this tool declares and all it requires, and pass its
        schema: how a call under a wrong name is matched to the tool it meant."""
        declared = set(self.parameters.get("properties", {}))
        required = set(self.parameters.get("required", []))
        if not arguments or not required <= set(arguments) <= declared:
            return False
        try:
            self.check(arguments)
        except ToolError:
            return False
        return True

    def check(self, arguments: Any) -> None:
        """Raise ToolError naming the first problem when the arguments do not fit the schema."""
        if not isinstance(arguments, dict):
            raise ToolError(f"arguments of {self.name} must be a JSON object, got {type(arguments).__name__}")
        if self._validator is None:
            cls = jsonschema.validators.validator_for(self.parameters)
            self._validator = cls(self.parameters)
        error = jsonschema.exceptions.best_match(self._validator.iter_errors(arguments))
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path) or "arguments"
            raise ToolError(f"invalid arguments for {self.name}: {where}: {error.message}")


def result_text(value: Any) -> str:
    """A tool's result as the text the model reads: strings as they are, anything else as compact JSON, with the
    chat format's control markers defused."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    for marker in _MARKERS:
        if marker in text:
            text = text.replace(marker, "\u2039" + marker[1:-1] + "\u203a")
    return text
