"""router.sim.memory on its own: what each sleep tier keeps, and which calls make the answers right again."""
from __future__ import annotations

from router.sim.memory import Memory


def test_level1_offloads_and_a_wake_restores_the_weights() -> None:
    m = Memory()
    assert m.sleep(1) is True  # the weights go to host RAM: the costly step
    assert m.restores(None) and m.restores(["weights"]) and not m.restores(["kv_cache"])
    assert m.wake(["weights"]) is False and not m.restores(None)  # already back
    assert m.wake(["kv_cache"]) is True
    assert m.answers_right and (m.asleep, m.level) == (False, 0)


def test_level0_keeps_everything_and_restores_nothing() -> None:
    m = Memory()
    assert m.sleep(0) is False and not m.restores(None)
    assert m.wake(None) and m.answers_right


def test_level2_loses_the_weights_until_reloaded_into_woken_memory() -> None:
    m = Memory()
    assert m.sleep(2) is False and not m.restores(None)  # nothing is copied back
    assert not m.weights_mapped
    m.wake(["weights"])
    assert m.weights_mapped and m.asleep
    m.reload()
    m.wake(["kv_cache"])
    assert m.answers_right and not m.asleep


def test_a_generation_on_lost_weights_stales_the_cache_until_reset() -> None:
    m = Memory()
    m.sleep(2)
    m.wake(None)
    assert not m.answers_right
    m.generated()
    m.reload()
    assert m.cache_stale and not m.answers_right
    m.reset_cache()
    assert m.answers_right
    m.generated()  # on right weights: the cache stays good
    assert m.answers_right


def test_sleep_deepens_but_never_lightens() -> None:
    m = Memory()
    m.sleep(1)
    assert m.sleep(2) is False and m.level == 2 and m.weights_lost
    m.sleep(1)
    assert m.level == 2
    m2 = Memory()
    m2.sleep(0)
    assert m2.sleep(1) is True  # from level 0 the weights still have to be copied out


def test_sglang_release_loses_weights_only_when_they_are_freed_for_good() -> None:
    kept = Memory()
    kept.release(None, frees_weights=False)
    kept.resume()
    assert kept.answers_right
    only_kv = Memory()
    only_kv.release(["kv_cache"], frees_weights=True)
    only_kv.resume()
    assert only_kv.answers_right
    lost = Memory()
    lost.release(None, frees_weights=True)
    assert lost.level == 2
    lost.resume()
    assert lost.weights_lost and lost.cache_stale
    lost.reload()
    assert not lost.answers_right
    lost.reset_cache()
    assert lost.answers_right
