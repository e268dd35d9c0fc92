"""SimCore: one simulated engine's state and its generation pipeline, without any route.

Everything a generation goes through lives here: the fault knobs, the sleep
gate, the concurrency queue, and token by token output with client-disconnect
checks. What the engine holds across sleep (router.sim.memory) decides whether
the text is right. The routes that drive it are each dialect's (api.py and the
*_api.py modules); request reading is validation.py, answer shapes dialects.py.
"""
from __future__ import annotations

import asyncio
import os
import random
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Optional

from . import textgen
from .dialects import Choice, CompletionShape, Dialect, Shape
from .errors import ApiError
from .http import Request, Responder
from .lora import Adapters
from .memory import Memory
from .options import SimOptions
from .validation import Generation, RequestReader

SLEEP_MODES = ("abort", "wait", "keep")
#: A non-streaming request checks for disconnects and sleep at least this often.
ANSWER_SLICE_S = 0.05


@dataclass
class Counters:
    """What /metrics reports; tests read these names (see the package docstring)."""

    requests: int = 0
    started: int = 0
    disconnects: int = 0
    sleep_calls: int = 0
    wake_calls: int = 0
    #: Weight reloads: vLLM's collective_rpc reload_weights, SGLang's update_weights_from_disk.
    reload_calls: int = 0
    #: Prefix-cache resets: vLLM's reset_prefix_cache, SGLang's flush_cache.
    cache_resets: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    running: int = 0
    waiting: int = 0


class SimCore:
    """The engine behind the routes: counters, sleep state and gates, and `run()`."""

    def __init__(self, options: SimOptions, dialect: Dialect):
        self.options = options
        self.dialect = dialect
        #: The LoRA adapters it holds (router/sim/lora.py); a loaded one is a model name too.
        self.adapters = Adapters(options.engine, options.argv)
        self.reader = RequestReader(options, dialect, self.adapters.loaded)
        self.counters = Counters()
        self.memory = Memory()
        #: The sleep-API calls received, in order (``"sleep level=2"``, ``"wake_up tags=weights"``...).
        self.calls: list[str] = []
        self.created = int(time.time())
        #: The port listened on (options.port until SimEngine.start binds it; 0 there picks a free one).
        self.port = options.port
        self._random = random.Random(options.seed)
        self._slots = asyncio.Semaphore(options.max_concurrency) if options.max_concurrency else None
        #: Open while new generations may start (closed asleep, released, or draining for sleep).
        self._gate = asyncio.Event()
        self._gate.set()
        #: Set while running generations may proceed (cleared by sleep mode=keep).
        self._awake = asyncio.Event()
        self._awake.set()
        self._idle = asyncio.Event()
        self._idle.set()
        #: Bumped by sleep mode=abort: generations started before it finish with "abort".
        self._abort_epoch = 0
        #: Held by every sleep-API call, so they apply one at a time and in order.
        self.control = asyncio.Lock()

    # ----------------------------------------------------------------- sleep
    @property
    def busy(self) -> bool:
        return bool(self.counters.running or self.counters.waiting)

    async def close_gate(self, mode: str) -> None:
        """Close the gate to new work, then deal with running work as `mode` (SLEEP_MODES) says."""
        self._gate.clear()
        if mode == "abort":
            self._abort_epoch += 1
        elif mode == "wait":
            await self._idle.wait()
        self._awake.clear()

    def open_gate(self) -> None:
        """Awake again: held and paused generations go on."""
        self._awake.set()
        self._gate.set()

    # -------------------------------------------------------------- generation
    async def run(self, gen: Generation, resp: Responder) -> None:
        """Generate `gen` and answer it on `resp`, through the fault knobs, sleep gate and queue."""
        o = self.options
        if self.memory.asleep and not self.dialect.holds_while_asleep:
            raise ApiError(500, "memory is released (release_memory_occupation); call "
                                "/resume_memory_occupation first. Real SGLang has no gate here and "
                                "would run on released GPU memory.", "InternalServerError")
        if o.fail_rate and self._random.random() < o.fail_rate:
            raise ApiError(500, "simulated engine failure (--fail-rate)", "InternalServerError")
        if o.hang:
            await self._until_disconnect(resp)
            return
        if not await self._admit(resp):
            return
        try:
            self.counters.started += 1
            self.counters.prompt_tokens += gen.prompt_tokens
            fatal = o.die_after > 0 and self.counters.started == o.die_after
            self._plan(gen)
            if gen.stream:
                await self._stream(gen, resp, fatal)
            else:
                await self._answer(gen, resp, fatal)
        finally:
            self.counters.running -= 1
            if self._slots is not None:
                self._slots.release()
            if not self.counters.running:
                self._idle.set()

    async def generate(self, req: Request, resp: Responder, chat: bool) -> None:
        """POST /v1/completions or /v1/chat/completions."""
        self.counters.requests += 1
        await self.run(self.reader.generation(self.reader.json_body(req), chat), resp)

    def _plan(self, gen: Generation) -> None:
        """Decide every choice's tokens up front: the rule of textgen (its garbage where the engine's
        weights or cache are lost, router.sim.memory), cut at the first stop string."""
        word = textgen.token if self.memory.answers_right else textgen.garbage
        self.memory.generated()
        mark = self.adapters.mark(gen.model)
        for prompt in gen.prompts:
            seed = textgen.prompt_seed(mark + prompt)
            for j in range(gen.n):
                pieces: list[str] = []
                text = ""
                finish, matched = "length", None
                for i in range(gen.max_tokens):
                    tok = word(seed, j, i)
                    hit = self._first_stop(text + tok, gen.stop, len(text)) if gen.stop else None
                    if hit is not None:
                        at, matched = hit
                        pieces.append(tok[:max(0, at - len(text))])
                        finish = "stop"
                        break
                    pieces.append(tok)
                    text += tok
                if gen.echo:
                    pieces[0] = prompt + pieces[0]
                if mark and pieces:
                    pieces[0] = mark + pieces[0]
                gen.choices.append(pieces)
                gen.finish.append(finish)
                gen.stop_reason.append(matched)

    @staticmethod
    def _first_stop(text: str, stops: list[str], since: int) -> Optional[tuple[int, str]]:
        best: Optional[tuple[int, str]] = None
        for s in stops:
            at = text.find(s, max(0, since - len(s) + 1))
            if at >= 0 and (best is None or at < best[0]):
                best = (at, s)
        return best

    # ------------------------------------------------------ admission, waits
    async def _admit(self, resp: Responder) -> bool:
        """Wait for the gate (sleep) and a slot (max concurrency); False if the client left.

        Only slot waits count as waiting in /metrics: real vLLM 0.32 shows a
        request held by sleep in neither its running nor its waiting gauge.
        """
        while True:
            if not self._gate.is_set() and not await self._race(self._gate.wait(), resp):
                return False
            if self._slots is None:
                break
            if self._slots.locked():
                self.counters.waiting += 1
                try:
                    if not await self._race(self._slots.acquire(), resp):
                        return False
                finally:
                    self.counters.waiting -= 1
            else:
                await self._slots.acquire()
            if self._gate.is_set():
                break
            self._slots.release()  # fell asleep while we queued: wait again
        self._enter()
        return True

    def _enter(self) -> None:
        self.counters.running += 1
        self._idle.clear()

    async def _race(self, aw: Awaitable[Any], resp: Responder) -> bool:
        """Await `aw` unless the client disconnects first (then count it, return False)."""
        task = asyncio.ensure_future(aw)
        lost = resp.wait_disconnect()
        await asyncio.wait((task, lost), return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                self.counters.disconnects += 1
                return False
        # Done (maybe in the same instant the client left): the caller owns what it got.
        return True

    async def _until_disconnect(self, resp: Responder) -> None:
        await resp.wait_disconnect()
        self.counters.disconnects += 1

    async def _step(self, delay: float, resp: Responder, epoch: int) -> Optional[str]:
        """Wait one token's time; None to go on, else why generation ends."""
        if delay:
            await asyncio.sleep(delay)
        if resp.disconnected:
            self.counters.disconnects += 1
            return "disconnect"
        if epoch != self._abort_epoch:
            return "abort"
        if not self._awake.is_set():  # slept with mode=keep: pause until woken
            if not await self._race(self._awake.wait(), resp):
                return "disconnect"
        return None

    # ----------------------------------------------------------------- output
    async def _answer(self, gen: Generation, resp: Responder, fatal: bool) -> None:
        """Wait the generation time in slices (not token by token: cheaper), then answer."""
        o, epoch = self.options, self._abort_epoch
        ttft, itl = o.ttft_ms / 1000, o.itl_ms / 1000
        steps = max(len(p) for p in gen.choices)
        due = ttft + (steps - 1) * itl  # when the last token is ready
        spent = 0.0  # generation time so far (pauses of sleep mode=keep excluded)
        while True:
            piece = min(due - spent, ANSWER_SLICE_S)
            why = await self._step(piece, resp, epoch)
            spent += piece
            if why == "disconnect":
                return
            if why == "abort" or spent >= due:
                break
        if fatal:
            os._exit(1)
        if why == "abort":
            ready = 0 if spent < ttft else (1 + int((spent - ttft) / itl) if itl else steps)
            produced = [min(ready, len(p)) for p in gen.choices]
        else:
            produced = [len(p) for p in gen.choices]
        choices = []
        for k, pieces in enumerate(gen.choices):
            done = produced[k] == len(pieces)
            choices.append(Choice(k, "".join(pieces[:produced[k]]), gen.finish[k] if done else "abort",
                                  gen.stop_reason[k] if done else None))
        total = sum(produced)
        self.counters.generation_tokens += total
        resp.send(200, self._shape(gen).whole(choices, gen.prompt_tokens, total))

    def _shape(self, gen: Generation) -> Shape:
        return gen.shape or CompletionShape(self.dialect, gen.chat, gen.include_usage, gen.model)

    async def _stream(self, gen: Generation, resp: Responder, fatal: bool) -> None:
        o, epoch = self.options, self._abort_epoch
        sse = self._shape(gen).stream()
        budget = o.stall_after or -1  # chunks left before a stall; -1: no limit
        resp.start_stream()
        out = sse.opening(len(gen.choices))
        if not await self._send(resp, out, budget):
            return
        budget -= len(out)
        steps = max(len(p) for p in gen.choices)
        total = 0
        ended = ""
        for i in range(steps):
            ended = await self._step((o.ttft_ms if i == 0 else o.itl_ms) / 1000, resp, epoch) or ""
            if ended:
                break
            out = []
            for k, pieces in enumerate(gen.choices):
                if i < len(pieces) - 1:
                    out.append(sse.token(k, pieces[i]))
                elif i == len(pieces) - 1:
                    out.append(sse.token(k, pieces[i], gen.finish[k], gen.stop_reason[k]))
            total += len(out)
            self.counters.generation_tokens += len(out)
            if not await self._send(resp, out, budget):
                return
            budget -= len(out)
            if fatal:
                await asyncio.sleep(0)
                os._exit(1)
        if ended == "disconnect":
            return
        out = []
        if ended == "abort":
            out = [sse.token(k, "", "abort") for k, pieces in enumerate(gen.choices) if len(pieces) > i]
        out += sse.closing(gen.prompt_tokens, total)
        if await self._send(resp, out, budget):
            resp.end()

    async def _send(self, resp: Responder, chunks: list[bytes], budget: int) -> bool:
        """Write SSE chunks, stalling forever (until disconnect) once `budget` runs out."""
        if not chunks:
            return True
        if 0 <= budget < len(chunks):
            resp.chunk(b"".join(chunks[:budget]))
            await self._until_disconnect(resp)
            return False
        resp.chunk(b"".join(chunks))
        return True

