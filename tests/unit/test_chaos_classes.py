"""benchmarks/chaos.py's verdict on a proxy worker's 503 "the router's controller went away": the
answer to a request lost in flight at a SIGKILL of the router (or sent just after it), and nothing else.

A worker answers so only when its link to the controller closes; with the controller alive (a
SIGTERM drains the workers first, an engine kill leaves the controller be) the answer is a real
failure, and the soak must count it against the router.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from chaos_stack import ENGINES  # noqa: E402
from chaos_verdict import CLASS_DOWN, CLASS_KILL, CLASS_OTHER, CONTROLLER_GONE, CONTROLLER_GONE_WITHIN, Fault, Request, classify  # noqa: E402

MARGIN = 2.0
RUN_END = 1000.0
MODEL = next(iter(ENGINES.values()))[0]


def gone(start: float, end: float) -> Request:
    return Request(client=0, model=MODEL, stream=False, chat=False, start=start, end=end, ok=False, what="503",
                   got_status=True, detail=f'{{"error": {{"message": "{CONTROLLER_GONE}", "code": 503}}}}')


def kill(kind: str = "router_kill", at: float = 100.0) -> Fault:
    target = next(n for n, (model, _, _) in ENGINES.items() if model == MODEL) if kind == "engine_kill" else "router"
    return Fault(kind=kind, target=target, injected=at, recovered=at + 8.0)


def test_waiting_at_a_sigkill_is_lost_in_flight_and_arriving_just_after_is_the_gap() -> None:
    assert classify(gone(99.0, 100.2), [kill()], MARGIN, RUN_END)[0] == CLASS_KILL
    assert classify(gone(100.1, 100.2), [kill()], MARGIN, RUN_END)[0] == CLASS_DOWN


def test_an_answer_later_than_a_dying_worker_can_give_is_unexplained() -> None:
    # Still inside the kill's window (recovery + margin), but no worker of the killed controller is left.
    late = 100.0 + CONTROLLER_GONE_WITHIN + 0.5
    assert late < 100.0 + 8.0 + MARGIN
    assert classify(gone(late - 0.1, late), [kill()], MARGIN, RUN_END) == (CLASS_OTHER, None)


def test_with_the_controller_alive_it_is_a_failure() -> None:
    for fault in (kill("router_term"), kill("engine_kill")):
        assert classify(gone(99.0, 100.2), [fault], MARGIN, RUN_END) == (CLASS_OTHER, None), fault.kind
    assert classify(gone(10.0, 10.1), [kill()], MARGIN, RUN_END) == (CLASS_OTHER, None)
