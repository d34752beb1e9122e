"""The refresh rule and scene cuts (stylize/schedule.py), and the two thread shapes (stylize/threads.py)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from stylize.schedule import RefreshSchedule, scene_cut, thumbnail
from stylize.threads import Pipe, produce


def test_refresh_schedule_first_period_cut_and_restart():
    s = RefreshSchedule(3)
    assert [s.step(cut=False) for _ in range(7)] == [True, False, False, True, False, False, True]
    assert s.step(cut=True)  # batch 7: a cut refreshes now ...
    assert not s.step(cut=False)
    assert s.step(cut=False)  # ... and the grid stays: batch 9 refreshes by the period
    s.restart()
    assert s.step(cut=False)
    chunk = RefreshSchedule(3, start=4)  # a chunk of a split clip from batch 4 (chunks.py)
    assert [chunk.step(cut=False) for _ in range(5)] == [True, False, True, False, False]


def test_next_is_periodic_only_asks():
    s = RefreshSchedule(2)
    assert s.step(cut=False) and not s.next_is_periodic  # batch 0 refreshed; batch 1 will not
    assert not s.step(cut=False)
    assert s.next_is_periodic and s.next_is_periodic  # asking twice changes nothing
    assert s.step(cut=False)  # batch 2


def test_scene_cut_is_a_pure_threshold_on_thumbnails():
    dark, bright = np.full((64, 64, 3), 10, np.uint8), np.full((64, 64, 3), 240, np.uint8)
    assert scene_cut(thumbnail(dark), thumbnail(bright), 0.3)
    assert not scene_cut(thumbnail(dark), thumbnail(dark), 0.3)
    assert not scene_cut(None, thumbnail(bright), 0.3)  # a clip's first batch
    assert not scene_cut(thumbnail(dark), thumbnail(bright), 0)  # detection off


def test_pipe_keeps_order_bounds_the_caller_and_raises_on_the_callers_thread():
    seen, gate = [], threading.Event()
    pipe = Pipe(lambda x: (gate.wait(), seen.append(x)), "t", limit=2)
    pipe.put(1)  # one unhandled: returns
    waiter = threading.Thread(target=pipe.put, args=(2,))
    waiter.start()
    time.sleep(0.2)
    assert waiter.is_alive()  # two unhandled: waits for the worker
    gate.set()
    waiter.join(5)
    pipe.join()
    assert seen == [1, 2]

    def broken(x):
        raise OSError(f"disk full at {x}")

    bad = Pipe(broken, "t")
    bad.put(1)
    with pytest.raises(OSError, match="disk full at 1"):
        bad.join()
    bad.put(2)  # works again after the error was raised (a new clip)
    with pytest.raises(OSError, match="disk full at 2"):
        bad.close()


def test_produce_makes_items_only_when_there_is_room_and_stops_when_closed():
    made = []

    def generate(stop):
        for i in range(100):
            if stop.is_set():
                return
            made.append(i)
            yield i

    items = produce(generate, "t", ahead=1)
    assert next(items) == 0
    time.sleep(0.2)
    assert made == [0, 1]  # one made ahead, no more
    items.close()
    assert len(made) <= 3
