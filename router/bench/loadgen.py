"""The load generator behind ``python -m router.bench``.

One aiohttp session (unlimited connector) drives every model at once, in a
closed loop (N workers, each sending its next request when the last ended) or
an open loop (Poisson arrivals at a fixed rate, whatever the server does), the
two ways the engines' own serving benchmarks load a server. Each stream is
parsed as SSE so a stream that does not end with ``data: [DONE]``, or that
carries an error event, counts as a failure and never as a success.
"""
from __future__ import annotations

import asyncio
import random
import time
from array import array
from collections import Counter
from dataclasses import dataclass, field
from typing import Mapping, Optional

import aiohttp
import orjson

ENDPOINTS: Mapping[str, str] = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}

#: Words prompts are drawn from; roughly one token each for common tokenizers.
_WORDS = tuple(f"w{i}" for i in range(1, 1000))


@dataclass(frozen=True)
class Span:
    """A length that is fixed (``128``) or drawn uniformly per request (``128:512``)."""

    lo: int
    hi: int

    @classmethod
    def parse(cls, text: str) -> "Span":
        parts = text.split(":")
        try:
            lo, hi = (int(parts[0]), int(parts[-1])) if len(parts) <= 2 else (0, -1)
        except ValueError:
            lo, hi = 0, -1
        if lo < 1 or hi < lo:
            raise ValueError(f"{text!r} is not a length: give N or LO:HI with 1 <= LO <= HI, e.g. 128 or 128:512")
        return cls(lo, hi)

    def sample(self, rng: random.Random) -> int:
        return self.lo if self.lo == self.hi else rng.randint(self.lo, self.hi)

    def __str__(self) -> str:
        return str(self.lo) if self.lo == self.hi else f"{self.lo}:{self.hi}"


@dataclass(frozen=True)
class Workload:
    """What load to send; exactly one of `concurrency` (closed) or `rate` (open)."""

    endpoint: str = "completions"
    stream: bool = True
    input_len: Span = Span(128, 128)
    output_len: Span = Span(128, 128)
    concurrency: Optional[int] = 1
    rate: Optional[float] = None
    duration: Optional[float] = 30.0
    requests: Optional[int] = None
    seed: int = 0
    timeout: float = 600.0

    @property
    def mode(self) -> str:
        return f"open loop {self.rate:g} req/s" if self.rate else f"closed loop x{self.concurrency}"


@dataclass(frozen=True)
class Target:
    """Where one model's requests go: (base URL, model name to send) per replica, used in turn."""

    model: str
    endpoints: tuple[tuple[str, str], ...]
    headers: Mapping[str, str] = field(default_factory=dict)


class Recorder:
    """Figures of one model's requests; cheap enough to update per chunk."""

    def __init__(self) -> None:
        self.ok = 0
        self.failed: Counter[str] = Counter()
        self.latency = array("d")
        self.ttft = array("d")
        self.gaps = array("d")
        self.output_tokens = 0
        self.chunks = 0
        self.elapsed = 0.0

    @property
    def done(self) -> int:
        return self.ok + sum(self.failed.values())

    def merge(self, other: "Recorder") -> None:
        """Add another phase's figures (compare-direct runs several phases per target)."""
        self.ok += other.ok
        self.failed.update(other.failed)
        self.latency.extend(other.latency)
        self.ttft.extend(other.ttft)
        self.gaps.extend(other.gaps)
        self.output_tokens += other.output_tokens
        self.chunks += other.chunks
        self.elapsed += other.elapsed


class _Budget:
    """Grants requests until the duration is up, the count is reached, or `stop` is set."""

    def __init__(self, work: Workload, stop: asyncio.Event):
        self._left = work.requests
        self._deadline = time.perf_counter() + work.duration if work.duration else None
        self._stop = stop

    def take(self) -> bool:
        if self._stop.is_set() or (self._deadline is not None and time.perf_counter() >= self._deadline):
            return False
        if self._left is not None:
            if self._left <= 0:
                return False
            self._left -= 1
        return True


class _Requester:
    """Builds and sends one model's requests, recording each outcome."""

    def __init__(self, session: aiohttp.ClientSession, target: Target, work: Workload, rng: random.Random,
                 rec: Recorder):
        self.session = session
        self.target = target
        self.work = work
        self.rng = rng
        self.rec = rec
        self._path = ENDPOINTS[work.endpoint]
        self._turn = 0
        self._headers = {"Content-Type": "application/json", **target.headers}

    def _body(self, model: str) -> bytes:
        prompt = " ".join(self.rng.choices(_WORDS, k=self.work.input_len.sample(self.rng)))
        body: dict = {"model": model, "max_tokens": self.work.output_len.sample(self.rng),
                      "temperature": 0.0, "ignore_eos": True, "stream": self.work.stream}
        if self.work.endpoint == "chat":
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        if self.work.stream:
            body["stream_options"] = {"include_usage": True}
        return orjson.dumps(body)

    async def send(self) -> None:
        endpoints = self.target.endpoints
        self._turn = (self._turn + 1) % len(endpoints)
        base, model = endpoints[self._turn]
        url, body = base + self._path, self._body(model)
        t0 = time.perf_counter()
        try:
            async with self.session.post(url, data=body, headers=self._headers) as resp:
                if resp.status != 200:
                    await resp.read()
                    self.rec.failed[str(resp.status)] += 1
                elif self.work.stream:
                    await self._stream(resp, t0)
                else:
                    self._whole(await resp.read(), t0)
        except aiohttp.ClientConnectorError:
            self.rec.failed["refused"] += 1
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError):
            self.rec.failed["disconnected"] += 1
        except asyncio.TimeoutError:
            self.rec.failed["timeout"] += 1
        except aiohttp.ClientError:
            self.rec.failed["client_error"] += 1

    def _whole(self, data: bytes, t0: float) -> None:
        latency = time.perf_counter() - t0
        try:
            doc = orjson.loads(data)
            tokens = int(doc["usage"]["completion_tokens"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            self.rec.failed["bad_body"] += 1
            return
        self.rec.ok += 1
        self.rec.latency.append(latency)
        self.rec.output_tokens += tokens

    async def _stream(self, resp: aiohttp.ClientResponse, t0: float) -> None:
        """Parse SSE as it arrives; a token is a chunk carrying generated text."""
        rec = self.rec
        buf = b""
        first = last = 0.0
        tokens = chunks = 0
        usage_tokens = None
        finished = False
        async for data in resp.content.iter_any():
            now = time.perf_counter()
            buf += data.replace(b"\r\n", b"\n") if b"\r" in data else data
            while not finished:
                end = buf.find(b"\n\n")
                if end < 0:
                    break
                event, buf = buf[:end], buf[end + 2:]
                for line in event.split(b"\n"):
                    if not line.startswith(b"data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == b"[DONE]":
                        finished = True
                        break
                    chunks += 1
                    try:
                        doc = orjson.loads(payload)
                    except orjson.JSONDecodeError:
                        rec.failed["bad_chunk"] += 1
                        return
                    if not isinstance(doc, dict) or "error" in doc:
                        rec.failed["stream_error"] += 1
                        return
                    choices = doc.get("choices")
                    if choices:
                        c = choices[0]
                        text = c.get("text") or (c.get("delta") or {}).get("content")
                        if text:
                            if tokens:
                                rec.gaps.append(now - last)
                            else:
                                first = now
                            last = now
                            tokens += 1
                    usage = doc.get("usage")
                    if usage:
                        usage_tokens = usage.get("completion_tokens")
        rec.chunks += chunks
        if not finished:
            rec.failed["truncated"] += 1
            return
        rec.ok += 1
        rec.latency.append(time.perf_counter() - t0)
        if tokens:
            rec.ttft.append(first - t0)
        rec.output_tokens += usage_tokens if isinstance(usage_tokens, int) else tokens


async def _closed(req: _Requester, budget: _Budget, concurrency: int) -> None:
    async def worker() -> None:
        while budget.take():
            await req.send()
    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def _open(req: _Requester, budget: _Budget, rate: float) -> None:
    """Poisson arrivals on an absolute schedule, so a slow server cannot slow the arrivals."""
    tasks: set[asyncio.Task] = set()
    due = time.perf_counter()
    while budget.take():
        task = asyncio.ensure_future(req.send())
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        due += req.rng.expovariate(rate)
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
    if tasks:
        await asyncio.gather(*tasks)


def new_session(timeout: float) -> aiohttp.ClientSession:
    """The one client session of a run: no connection limit, so the client never queues."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=False),
                                 timeout=aiohttp.ClientTimeout(total=timeout),
                                 skip_auto_headers=("User-Agent",))


async def send_burst(session: aiohttp.ClientSession, target: Target, work: Workload, rng: random.Random, n: int,
                     first: Recorder, rest: Recorder) -> None:
    """`n` requests at once (the swap pattern's burst); the first one sent goes to `first`, on its own,
    because it is the one whose wait the model's state (stopped, asleep, awake) decided."""
    lead = _Requester(session, target, work, rng, first)
    others = _Requester(session, target, work, rng, rest)
    await asyncio.gather(lead.send(), *(others.send() for _ in range(n - 1)))


async def run_model(session: aiohttp.ClientSession, target: Target, work: Workload, stop: asyncio.Event,
                    rec: Recorder) -> None:
    """Drive one model until the budget ends; figures go to `rec` live, so progress can read them."""
    rng = random.Random(f"{work.seed}:{target.model}")
    req = _Requester(session, target, work, rng, rec)
    budget = _Budget(work, stop)
    t0 = time.perf_counter()
    if work.rate:
        await _open(req, budget, work.rate)
    else:
        await _closed(req, budget, work.concurrency or 1)
    rec.elapsed += time.perf_counter() - t0
