"""The measured costs: a guess until the first measurement, then a moving estimate per instance and
kind; a model's estimate is its slowest replica's; listeners hear every measurement."""
from __future__ import annotations

import pytest

from router.server.fleet.costs import DEFAULT_GUESSES, SLEEP, START, Costs, wake_kind


def test_an_unmeasured_instance_has_the_guess_with_no_samples() -> None:
    costs = Costs()
    got = costs.estimate("a", wake_kind(2))
    assert (got.seconds, got.samples, got.last) == (DEFAULT_GUESSES[wake_kind(2)], 0, None)
    assert Costs({START: 90.0, SLEEP: 1.0}).estimate("a", wake_kind(1)).seconds == 90.0  # unknown kind: the start's


def test_the_first_measurement_replaces_the_guess_and_later_ones_move_it_by_the_weight() -> None:
    costs = Costs(weight=0.5)
    costs.observe("m", ["a"], wake_kind(1), 2.0)
    assert costs.estimate("a", wake_kind(1)).seconds == 2.0
    costs.observe("m", ["a"], wake_kind(1), 4.0)
    got = costs.estimate("a", wake_kind(1))
    assert (got.seconds, got.samples, got.last) == (3.0, 2, 4.0)
    assert costs.estimate("a", wake_kind(2)).samples == 0  # each tier on its own


def test_one_outlier_moves_the_estimate_only_by_its_weight() -> None:
    costs = Costs()
    for _ in range(5):
        costs.observe("m", ["a"], START, 40.0)
    costs.observe("m", ["a"], START, 400.0)
    assert costs.estimate("a", START).seconds == pytest.approx(40.0 + 0.3 * 360.0)


def test_a_model_costs_what_its_slowest_replica_does() -> None:
    costs = Costs()
    costs.observe("m", ["a"], SLEEP, 1.0)
    costs.observe("m", ["b"], SLEEP, 3.0)
    got = costs.of_model(["a", "b"])
    assert got[SLEEP] == {"seconds": 3.0, "samples": 1, "last": 3.0}
    assert set(got) == set(DEFAULT_GUESSES) and got[START]["samples"] == 0


def test_listeners_hear_each_measurement_once_per_model() -> None:
    costs = Costs()
    heard: list[tuple[str, str, float]] = []
    costs.subscribe(lambda *a: heard.append(a))
    costs.observe("m", ["a", "b"], wake_kind(2), 1.5)
    assert heard == [("m", "wake_2", 1.5)]
    assert costs.estimate("a", wake_kind(2)).samples == costs.estimate("b", wake_kind(2)).samples == 1
