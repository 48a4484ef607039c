"""`qwenkit serve`: listen at once, load the model in the background, drain on SIGTERM.

SIGTERM (or Ctrl-C): /health turns 503 and new generation requests get 503 on open connections, uvicorn closes
the listening socket and waits (up to drain_timeout) for the responses in flight, streams included, then the app's
lifespan lets the engine finish and stops it, and the process exits 0.
"""

from __future__ import annotations

import logging
import signal
import socket
import sys

import uvicorn

from qwenkit.errors import QwenkitError
from qwenkit.serve.app import create_app
from qwenkit.serve.service import FAILED, ModelService, ServeConfig

log = logging.getLogger("qwenkit.serve")


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, service: ModelService):
        super().__init__(config)
        self.service = service

    def handle_exit(self, sig: int, frame) -> None:
        self.service.drain()
        super().handle_exit(sig, frame)

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        with self.capture_signals():
            await self._serve(sockets)
            # uvicorn re-raises the signal it caught once it has shut down; a drained SIGTERM is a clean exit (0).
            self._captured_signals = [s for s in self._captured_signals if s != signal.SIGTERM]


def _bind(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        raise QwenkitError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e
    sock.set_inheritable(True)
    return sock


def serve(config: ServeConfig, verbose: int = 0) -> int:
    """Run the server until SIGTERM / Ctrl-C; raises QwenkitError if the model cannot be loaded."""
    sock = _bind(config.host, config.port)
    host, port = sock.getsockname()[:2]
    service = ModelService(config)
    app = create_app(service)
    uv_config = uvicorn.Config(
        app, log_config=None, access_log=verbose > 0, lifespan="on",
        timeout_graceful_shutdown=config.drain_timeout, timeout_keep_alive=30,
    )
    server = _Server(uv_config, service)

    def failed(error: BaseException) -> None:
        server.should_exit = True

    where = f"[{host}]" if ":" in host else host
    print(f"qwenkit serve: listening on http://{where}:{port} (loading {config.model})", file=sys.stderr, flush=True)
    service.start_loading(on_failure=failed)
    server.run(sockets=[sock])
    if service.state == FAILED:
        e = service.error
        if isinstance(e, QwenkitError):
            raise e
        raise QwenkitError(f"loading {config.model} failed: {type(e).__name__}: {e}") from e
    return 0
