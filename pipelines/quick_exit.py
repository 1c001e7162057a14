"""The `ssl-prune` CLI's processes skip Python's last garbage collection when they exit.

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

That last point is a choice for the whole process, so only the CLI makes it: its run, evaluate and
train-encoder verbs call `install` in the driver and mark the Ray they start
(`runtime.quick_exit_workers`), whose workers and actors then run `worker_setup_hook()` as Ray's
`worker_process_setup_hook`. Importing `pipelines` or `prune` from the Python API changes nothing
about how a process exits.
"""

from __future__ import annotations

import os

MARK = "SSL_PRUNE_QUICK_EXIT"  # set to the pid of a process whose heap freezes at exit (its children's differ)


def worker_setup_hook():
    """The freeze as Ray's worker_process_setup_hook. A nested function, so Ray ships it by value,
    and the stdlib alone: a worker runs it before it can import a checkout's `pipelines` (the
    driver's path reaches workers later), and a hook that fails to import fails every worker."""

    def freeze_heap_at_exit() -> None:
        import atexit
        import gc
        import os

        if os.environ.get(MARK) != str(os.getpid()):  # once per process
            atexit.register(gc.freeze)
            os.environ[MARK] = str(os.getpid())

    return freeze_heap_at_exit


def install() -> None:
    """Freeze this process's heap at exit (the CLI's driver; its workers get `worker_setup_hook`)."""
    worker_setup_hook()()


def installed() -> bool:
    """Whether this process freezes at exit (a Ray task reports it for its worker)."""
    return os.environ.get(MARK) == str(os.getpid())
