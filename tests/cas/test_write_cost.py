"""WriteCost: small blob writes move off the event loop while they are slow, and come back."""

from __future__ import annotations

from reexec.cas.write_cost import WriteCost


def test_inline_until_writes_are_slow_and_back_once_cheap_again() -> None:
    cost = WriteCost(limit_s=200e-6, weight=0.2)
    assert cost.inline()  # nothing measured yet
    for _ in range(3):
        cost.note(40e-6)
    assert cost.inline()
    for _ in range(10):
        cost.note(1.2e-3)  # a slow disk
    assert not cost.inline()
    for _ in range(30):
        cost.note(40e-6)  # measured in the thread, the disk is quick again
    assert cost.inline()


def test_one_outlier_does_not_move_writes_off_the_loop() -> None:
    cost = WriteCost()
    for _ in range(50):
        cost.note(30e-6)
    cost.note(2e-3)
    assert cost.inline()
