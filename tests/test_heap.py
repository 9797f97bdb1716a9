"""bitserve.heap: start-up garbage is collected first, what survives is frozen out of later collections."""

import gc
import weakref

from bitserve.heap import freeze_startup_heap


class Node:
    pass


def test_freeze_collects_start_up_garbage_then_freezes_the_rest():
    cycle = Node()
    cycle.self = cycle  # garbage only a collection finds
    dead = weakref.ref(cycle)
    del cycle
    kept = Node()
    threshold = gc.get_threshold()
    try:
        frozen = freeze_startup_heap()
        assert gc.get_threshold()[0] >= 20_000 and gc.get_threshold()[1:] == threshold[1:]
        assert dead() is None, "start-up garbage was frozen instead of collected"
        assert frozen == gc.get_freeze_count() > 0
        assert not any(o is kept for o in gc.get_objects())  # frozen objects are outside every generation
    finally:
        gc.unfreeze()  # the test process goes on collecting as usual
        gc.set_threshold(*threshold)
    assert any(o is kept for o in gc.get_objects())
