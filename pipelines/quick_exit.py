"""Processes that ran our code skip Python's last garbage collection when they exit.

At exit Python collects every object it tracks; in a process that imported torch, open_clip or
matplotlib that walk takes about a second of CPU (1.05 s for a process holding the demo's encoder,
0.23 s with this). Ray ends its workers and the embed actors that way while the next stage runs,
so on a small machine that second is taken from the stages after them. `gc.freeze()` in an
exit handler moves every object into the permanent generation, which that collection skips;
the operating system frees the memory as it does anyway. Other exit handlers (Ray's shutdown,
logging's flush) run before or after it as registered, and do their work either way; objects
freed by reference counting as modules are torn down still run their finalizers. What no longer
runs at exit is the finalizer of an object left in a reference cycle: our outputs are closed by
context managers (OutputDir.open_atomic), never left to one.
"""

from __future__ import annotations

import atexit
import gc


def install() -> None:
    """Freeze the heap at exit: pipelines/__init__.py calls it once, when a process imports us."""
    atexit.register(gc.freeze)
