"""Hybrid routing: hosted backends first, the on-device model when the network fails, even mid-answer.

Layout: config.py (route.yaml), breaker.py (circuit breaker), backends.py (openai over HTTP, native in-process),
router.py (failover policy, mid-stream continuation, probes), client.py (qwenkit.Client). The HTTP front end is
qwenkit.serve.route_app (`qwenkit serve --route route.yaml`).
"""

from qwenkit._lazy import lazy_exports
from qwenkit.route.config import BackendConfig, RouteConfig, load_route, parse_route

__all__ = ["BackendConfig", "Client", "RouteConfig", "Router", "load_route", "parse_route"]

__getattr__ = lazy_exports("qwenkit.route", {"Router": "qwenkit.route.router", "Client": "qwenkit.route.client"})
