"""A circuit breaker per backend: stop sending requests to a host that keeps failing, try again after a cooldown.

closed --(N consecutive failures)--> open --(cooldown elapsed)--> half-open --(success)--> closed
                                      ^------------------(failure)-----------------------'
While open, requests skip the backend at once (no connect or first-token timeout to sit through): this is the
router's offline mode. A successful health probe closes it early, which is how a recovered host comes back.

A probe only vouches for the host being up, not for its completions: it never clears the failures that requests
recorded, so a host closed on a probe's word goes straight back to open on its next failed request. Once that has
happened (probes answer, completions fail: a host that serves /health but hangs on generation), probes are no
longer believed; the half-open trial after the cooldown decides, or a probe that sees the host go down and up.
"""

from __future__ import annotations

import time
from collections.abc import Callable

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half-open"


class Breaker:
    def __init__(self, failures: int = 3, cooldown: float = 30.0, clock: Callable[[], float] = time.monotonic):
        self.threshold = failures
        self.cooldown = cooldown
        self.clock = clock
        self.failures = 0
        self.opened_at: float | None = None
        self._trial = False  # a half-open trial request is in flight
        self._vouched = False  # closed by a probe, and no request has succeeded since
        self._believe_probes = True

    @property
    def state(self) -> str:
        if self.opened_at is None:
            return CLOSED
        return HALF_OPEN if self.clock() - self.opened_at >= self.cooldown else OPEN

    def allow(self) -> bool:
        """Whether a request may go to this backend now. Half-open lets one trial through at a time."""
        state = self.state
        if state == CLOSED:
            return True
        if state == HALF_OPEN and not self._trial:
            self._trial = True
            return True
        return False

    def success(self) -> None:
        """A request was served (or refused as invalid: the host answered)."""
        self.failures, self.opened_at, self._trial = 0, None, False
        self._vouched, self._believe_probes = False, True

    def failure(self) -> None:
        """A request failed (refused connection, timeout, 5xx, a stream cut short)."""
        if self._vouched:  # the probe said the host was fine; its completions say otherwise
            self._vouched, self._believe_probes = False, False
        self._count_failure()

    def probe(self, ok: bool) -> None:
        """A health probe's result. A good one closes an open (or half-open) breaker, keeping the failure count;
        a failed one counts as a failure and makes the next good probe believable again (the host went down,
        so coming back up is news)."""
        if not ok:
            self._vouched, self._believe_probes = False, True
            self._count_failure()
        elif self.opened_at is not None and self._believe_probes:
            self.opened_at, self._trial, self._vouched = None, False, True

    def _count_failure(self) -> None:
        self.failures += 1
        self._trial = False
        if self.opened_at is not None or self.failures >= self.threshold:
            self.opened_at = self.clock()  # a failed trial (or probe) restarts the cooldown

    def trip(self) -> None:
        """Open now (a health probe found the host unreachable: no request should wait on it)."""
        self.failures = max(self.failures, self.threshold)
        self.opened_at, self._trial = self.clock(), False
