"""Admission in-process: slots bound what is in the stages, and idle means nothing left but held results."""

from __future__ import annotations

import threading

from appliance.scoring.admission import Admission


def test_a_full_stage_blocks_the_next_input_until_a_slot_is_released() -> None:
    counts: list[int] = []
    admission = Admission(2, counts.append)
    admission.admit()
    admission.admit()
    entered = threading.Event()

    def third() -> None:
        admission.admit()
        entered.set()

    waiter = threading.Thread(target=third)
    waiter.start()
    assert not entered.wait(0.2)  # the third waits while both slots are taken
    admission.arrived()
    admission.release()
    assert entered.wait(10)
    waiter.join()
    assert counts == [1, 2, 1, 2]
    assert admission.coming()  # two admitted inputs have not reached the batcher yet


def test_idle_counts_results_held_for_disk_space_as_done() -> None:
    admission = Admission(4, lambda _: None)
    admission.admit()
    admission.arrived()
    assert not admission.wait_idle(0.05)
    admission.set_held(1)  # its result waits for space: nothing else can finish
    assert admission.wait_idle(0.05)
    assert admission.unfinished() == 0 and admission.in_flight() == 1
    admission.set_held(0)
    admission.release()
    assert admission.wait_idle(0.05) and admission.in_flight() == 0
