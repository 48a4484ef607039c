"""Message drafts: the assistant writes, the user sends. This tool has no way to send anything."""

from __future__ import annotations

from typing import Any

from qwenkit.apps.assistant.tool import Tool


def draft_message_tool(drafts: list[dict[str, Any]]) -> Tool:
    """Each draft is appended to `drafts` (the agent shows them to the user to confirm and send themselves)."""

    def run(args: dict[str, Any]) -> str:
        draft = {"to": args["to"], "text": args["text"], "channel": args.get("channel", "message")}
        if args.get("subject"):
            draft["subject"] = args["subject"]
        drafts.append(draft)
        return (f"Draft {len(drafts)} saved for the user to review; it has NOT been sent. "
                f"To: {draft['to']} ({draft['channel']}). Text: {draft['text']}")

    return Tool(
        name="draft_message",
        use_when="the user asks to tell, text, message or email someone",
        description="Draft a text message, chat message or email to someone, for the user to review and send. "
                    "Never sends.",
        parameters={
            "type": "object",
            "properties": {
                "to": {"type": "string", "description": "recipient name, number or address"},
                "text": {"type": "string", "description": "the message body"},
                "channel": {"type": "string", "enum": ["message", "sms", "email", "chat"]},
                "subject": {"type": "string", "description": "email subject"},
            },
            "required": ["to", "text"],
        },
        run=run,
    )
