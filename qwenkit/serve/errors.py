"""Every error the server returns, as OpenAI's body: {"error": {"message", "type", "param", "code"}}.

qwenkit's exception hierarchy is mapped to HTTP statuses here, once; pydantic's validation errors become one
message naming the field at fault. Anything unexpected is a 500 with a generic message (the traceback goes to the
server log, never to the client).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pydantic import ValidationError

from qwenkit import errors
from qwenkit.serve.protocol import UNSUPPORTED_FIELDS


@dataclass
class APIError(Exception):
    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] | None = None

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# Most specific class first: TemplateError is a BadRequest, ContextTooLong is its own branch.
_STATUS: list[tuple[type[errors.QwenkitError], int, str, str | None]] = [
    (errors.ContextTooLong, 400, "invalid_request_error", "context_length_exceeded"),
    (errors.BadRequest, 400, "invalid_request_error", None),
    (errors.Overloaded, 429, "rate_limit_error", "rate_limit_exceeded"),
    (errors.RequestTimeout, 408, "timeout_error", "request_timeout"),
    (errors.EngineStopped, 503, "service_unavailable", "server_shutting_down"),
]

RETRY_AFTER_SECONDS = "1"  # a full queue drains in about a decode step per waiting request; retry soon


def from_qwenkit(e: errors.QwenkitError) -> APIError:
    for cls, status, kind, code in _STATUS:
        if isinstance(e, cls):
            headers = {"Retry-After": RETRY_AFTER_SECONDS} if status == 429 else None
            param = _param_of(str(e)) if cls is errors.BadRequest else None
            return APIError(status, str(e), kind, param, code, headers)
    return APIError(500, str(e), "server_error", None, "internal_error")


# "messages[0].content: ..." (chat template checks) or "temperature must be ..." (SamplingParams checks)
_PARAM = re.compile(r"^([A-Za-z_][\w]*(?:\[\d+\]|\.[A-Za-z_]\w*)*)(?::| must | is )")


def _param_of(message: str) -> str | None:
    m = _PARAM.match(message)
    return m.group(1) if m else None


def _is_union_tag(part: object) -> bool:
    """pydantic puts the union member it tried into the error location ('str', 'list[TextPart]', 'ToolCall')."""
    return isinstance(part, str) and (
        any(c in part for c in "[]()'") or part in {"str", "int", "float", "bool", "dict", "list", "none"}
        or part.startswith("function-") or part[:1].isupper()
    )


def _path(loc: tuple) -> str:
    out = ""
    for part in loc:
        if _is_union_tag(part):
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def from_validation(e: ValidationError) -> APIError:
    """One 400 naming the first field at fault (within it, the deepest error: for a union such as content: str |
    list of parts, the member that matched furthest says the most)."""
    errs = e.errors(include_url=False)
    head = _path(tuple(errs[0]["loc"]))
    first = max((x for x in errs if _path(tuple(x["loc"])).startswith(head)), key=lambda x: len(_path(tuple(x["loc"]))))
    kind, loc = first["type"], tuple(first["loc"])
    if kind in ("union_tag_invalid", "union_tag_not_found"):  # a content part of no known type: name its `type`
        loc += (str(first.get("ctx", {}).get("discriminator", "type")).strip("'"),)
    path = _path(loc)
    if kind == "json_invalid":
        return APIError(400, f"request body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}")
    if kind == "model_type" and not path:
        return APIError(400, "request body must be a JSON object")
    if kind == "extra_forbidden":
        name = str(loc[-1])
        if len(loc) == 1 and name in UNSUPPORTED_FIELDS:
            return APIError(400, f"field '{name}' is not supported by this server", param=path,
                            code="unsupported_parameter")
        return APIError(400, f"unknown field '{path}'", param=path, code="unknown_parameter")
    if kind == "missing":
        return APIError(400, f"missing required field '{path}'", param=path, code="missing_parameter")
    return APIError(400, f"invalid value for '{path}': {first['msg']}", param=path, code="invalid_type")
