"""One small exception hierarchy, mapped once to CLI messages (cli.py) and later to HTTP status codes.

Every error a user can cause (a bad file, an unknown model name, a prompt that does not fit) is a QwenkitError with
a one-line message that names the file or field at fault. Anything else is a bug and may show a traceback.
"""


class QwenkitError(Exception):
    """Base of every user-facing error. str(e) is the one-line message shown to the user."""

    exit_code = 1


class ModelNotFound(QwenkitError):
    """A model reference is neither a known short name, a hub id we can reach, nor a local path."""


class BadCheckpoint(QwenkitError):
    """A checkpoint file or folder is unreadable, truncated, corrupt or inconsistent (shapes, dtypes, names)."""


class UnsupportedModel(BadCheckpoint):
    """A well-formed checkpoint of an architecture or tensor type qwenkit does not implement."""


class ChecksumMismatch(QwenkitError):
    """A downloaded or assembled file does not have the sha256 we pinned for it."""


class DownloadError(QwenkitError):
    """A download failed (network unreachable, HTTP error) and no offline source could serve the file."""


class ContextTooLong(QwenkitError):
    """A prompt (plus the tokens asked for) does not fit in the model's context window."""


class BadRequest(QwenkitError):
    """Invalid arguments to a public API call: unknown sampling field, out-of-range value, malformed messages."""


class TemplateError(BadRequest):
    """The chat template raised (raise_exception in the template) or could not render the conversation."""


class BadImage(BadRequest):
    """An input image qwenkit cannot use: not an image, truncated or corrupt, a format other than JPEG, PNG or WebP,
    too many pixels, or too extreme an aspect ratio. The message names the image (a path, or "image 2 of the request").
    A BadRequest, so the server answers 400 like any other bad argument."""


class Overloaded(QwenkitError):
    """The engine's queue is full: the caller should retry later (HTTP 429 with Retry-After)."""


class RequestTimeout(QwenkitError):
    """A request ran past its deadline and was stopped; its KV cache blocks are already freed."""


class EngineStopped(QwenkitError):
    """The engine is shutting down (SIGTERM) and takes no new requests (HTTP 503)."""


class BadConfig(QwenkitError):
    """A configuration file (a router's route.yaml) is invalid; the message names the file and line."""


class BadData(QwenkitError):
    """A training or evaluation data file has a line qwenkit cannot use; the message names the file and line."""
