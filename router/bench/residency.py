"""``bench --compare-direct`` keeps an eye on residency: a model that starts, stops, sleeps or wakes
during the run has no comparison.

The comparison divides the router phases' figures by the direct phases'. An
on-demand model that starts in the first router phase, or one that sleeps
between phases and wakes on the next router request, puts its load or wake
time in the router's column only, and the ratio then measures residency, not
the router. The router's own counters (``router_model_{starts,stops,sleeps,wakes}_total``
on ``/metrics``) only ever grow, so one reading before the run and one after
show every change, even one undone before the run ended.
"""
from __future__ import annotations

from collections import Counter
from typing import Mapping, Optional, Sequence

import aiohttp

from router.bench.loadgen import new_session
from router.bench.swap import COUNTERS, read_counters

#: Counter name -> how a change is said ("started 1x").
VERBS = {"starts": "started", "stops": "stopped", "sleeps": "slept", "wakes": "woke"}


class ResidencyWatch:
    """Readings of the router's residency counters for `models`, before and after a run."""

    def __init__(self, url: str, headers: Mapping[str, str], models: Sequence[str]):
        self.url, self.headers, self.models = url, dict(headers), list(models)
        self.before: Optional[dict[str, Counter[str]]] = None
        #: Why the counters could not be read, if they could not: the comparison then goes unchecked.
        self.error: Optional[str] = None

    async def _read(self, timeout: float) -> Optional[dict[str, Counter[str]]]:
        try:
            async with new_session(timeout) as session:
                async with session.get(self.url + "/metrics", headers=self.headers) as resp:
                    if resp.status != 200:
                        raise aiohttp.ClientError(f"HTTP {resp.status}")
                    return read_counters(await resp.text())
        except (aiohttp.ClientError, OSError, ValueError) as e:
            self.error = f"cannot read {self.url}/metrics ({e or type(e).__name__})"
            return None

    async def start(self, timeout: float) -> None:
        self.before = await self._read(timeout)

    async def changes(self, timeout: float) -> dict[str, dict[str, int]]:
        """Model -> {counter: how much it grew} for every model whose residency changed during the run."""
        if self.before is None:
            return {}
        after = await self._read(timeout)
        if after is None:
            return {}
        out = {}
        for model in self.models:
            grew = {name: int(after[name][model] - self.before[name][model]) for name in COUNTERS.values()}
            grew = {name: n for name, n in grew.items() if n > 0}
            if grew:
                out[model] = grew
        return out

    @staticmethod
    def refusal(grew: Mapping[str, int]) -> dict[str, str]:
        """The comparison entry of a model whose residency changed: why there are no ratios."""
        what = ", ".join(f"{VERBS[name]} {n}x" for name, n in grew.items())
        return {"refused": f"its residency changed during the run ({what}); run again with it awake throughout "
                           "(send it a request first; pin: true keeps it from idle sleeps and stops)"}

    def warnings(self, changed: Mapping[str, Mapping[str, int]]) -> list[str]:
        out = [f"{m}: no router/direct comparison: {self.refusal(grew)['refused']}" for m, grew in changed.items()]
        if self.error is not None:
            out.append(f"{self.error}: a model that started, slept or woke during the run would go unnoticed, "
                       "and its ratios would measure that, not the router")
        return out
