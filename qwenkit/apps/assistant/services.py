"""The web services behind the built-in tools, and the one way the tools talk to them.

Each service is configured by base URL and optional key (flags of `qwenkit assistant`, or QWENKIT_<NAME>_URL and
QWENKIT_<NAME>_KEY). A request times out, is retried once on a network error, timeout or 5xx, and any failure
becomes a ToolError whose message names the service, so the model can tell the user what went wrong.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

from qwenkit.apps.assistant.tool import ToolError

USER_AGENT = "qwenkit-assistant/0.1 (+https://github.com/qwenkit)"  # Nominatim's policy requires one that identifies us

# name -> (what it is, public default URL or None when there is no public instance to use)
KNOWN = {
    "osrm": ("directions service (OSRM)", "https://router.project-osrm.org"),
    "nominatim": ("place search (Nominatim)", "https://nominatim.openstreetmap.org"),
    "searxng": ("web search (SearXNG)", None),  # public instances refuse API use: point it at your own
    "open_meteo": ("weather service (Open-Meteo)", "https://api.open-meteo.com"),
}


@dataclass
class Service:
    name: str  # a key of KNOWN
    base_url: str
    api_key: str | None = None
    timeout: float = 8.0
    retries: int = 1
    backoff: float = 0.3
    _client: Any = field(default=None, init=False, repr=False)

    def _http(self) -> Any:
        """One client per service, kept: its connections (and TLS sessions) serve every later call, from any of
        the agent's tool threads."""
        if self._client is None:
            import httpx2

            self._client = httpx2.Client(timeout=self.timeout, follow_redirects=True)
        return self._client

    @property
    def label(self) -> str:
        return f"{KNOWN[self.name][0]} at {self.base_url}"

    def get_json(self, path: str, params: dict[str, Any] | None = None, key_param: str | None = None) -> Any:
        """GET base_url + path and decode the JSON answer. key_param: the query parameter that carries the key
        (Open-Meteo's `apikey`); otherwise a key goes in an Authorization header."""
        import httpx2

        params = dict(params or {})
        headers = {"User-Agent": USER_AGENT, "Accept": "application/json"}
        if self.api_key:
            if key_param:
                params[key_param] = self.api_key
            else:
                headers["Authorization"] = f"Bearer {self.api_key}"
        url = self.base_url.rstrip("/") + path
        failure = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff)
            try:
                r = self._http().get(url, params=params, headers=headers)
            except httpx2.TimeoutException:
                failure = f"timed out after {self.timeout:g} s"
                continue
            except httpx2.HTTPError as e:
                failure = f"could not be reached ({type(e).__name__}: {e})"
                continue
            if r.status_code >= 500:
                failure = f"answered HTTP {r.status_code}"
                continue
            if r.status_code >= 400:
                raise ToolError(f"{self.label} refused the request: HTTP {r.status_code}: {_excerpt(r.text)}")
            try:
                return r.json()
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise ToolError(f"{self.label} answered with invalid JSON: {_excerpt(r.text)}") from None
        raise ToolError(f"{self.label} {failure}" + (" (tried twice)" if self.retries else ""))


def _excerpt(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


def services_from_env(overrides: dict[str, str | None] | None = None, timeout: float = 8.0) -> dict[str, Service]:
    """The configured services: flags (overrides, name -> URL) first, then QWENKIT_<NAME>_URL, then the public
    default. A service with no URL is absent, and so are the tools that need it."""
    overrides = overrides or {}
    found = {}
    for name, (_, default) in KNOWN.items():
        env = name.upper()
        url = overrides.get(name) or os.environ.get(f"QWENKIT_{env}_URL") or default
        if url:
            found[name] = Service(name, url, os.environ.get(f"QWENKIT_{env}_KEY") or None, timeout=timeout)
    return found
