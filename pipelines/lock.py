"""One driver per output directory: `_lock.json` names the driver that holds it (host, pid) and
its last heartbeat. A second driver refuses with a message naming the holder; a lock whose driver
is dead (same host: no such process; another host: no heartbeat for `STALE_S`) is taken over.

Object stores have no atomic create-if-absent through fsspec, so two drivers starting in the
same instant could both write; each reads the lock back after writing and only the one whose
token is there proceeds (the other refuses), which is what matters: never two writers at once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import uuid

from prune.io.storage import InputError, OutputDir

LOCK_FILE = "_lock.json"
HEARTBEAT_S = 30.0  # how often the holder refreshes its lock
STALE_S = 180.0  # a lock from another host with no heartbeat for this long is a dead driver's
log = logging.getLogger("ssl_prune")


class OutputLocked(InputError):
    """Another live driver is working on this output directory."""


def _alive(lock: dict) -> bool:
    if lock.get("host") == socket.gethostname():
        try:
            os.kill(int(lock["pid"]), 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # a process of another user: it exists
            return True
        return True
    return time.time() - float(lock.get("beat", 0)) < STALE_S


def _describe(lock: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(lock.get("started", 0))))
    return f"pid {lock.get('pid')} on {lock.get('host')} (since {started})"


@contextlib.contextmanager
def output_lock(out: OutputDir, heartbeat_s: float = HEARTBEAT_S):
    """Hold the output directory's lock for the duration of the block."""
    if out.exists(LOCK_FILE):
        other = out.read_json(LOCK_FILE)
        if _alive(other):
            raise OutputLocked(f"output {out.url} is in use by another ssl-prune driver, {_describe(other)}; "
                               f"wait for it, or stop it (a dead driver's lock is taken over)")
        log.warning("output %s: taking over the lock of a driver that is gone, %s", out.url, _describe(other))
    me = {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex, "started": time.time()}
    out.write_json(me | {"beat": time.time()}, LOCK_FILE)
    if out.read_json(LOCK_FILE).get("token") != me["token"]:
        raise OutputLocked(f"output {out.url}: another driver took the lock at the same moment")
    stop = threading.Event()

    def beat():
        while not stop.wait(heartbeat_s):
            try:
                out.write_json(me | {"beat": time.time()}, LOCK_FILE)
            except Exception:  # noqa: BLE001 - a missed beat is retried; the run goes on
                log.warning("output %s: could not refresh the lock", out.url)

    thread = threading.Thread(target=beat, name="ssl-prune-lock", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        with contextlib.suppress(Exception):
            if out.read_json(LOCK_FILE).get("token") == me["token"]:
                out.remove(LOCK_FILE)
