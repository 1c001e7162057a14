"""One driver per output directory: `_lock.json` names the driver that holds it (host, pid, a random
token) and its last heartbeat. A second driver refuses with a message naming the holder; a lock
whose driver is dead (same host: no such process; another host: no heartbeat for `STALE_S`) is
taken over.

Exclusive, not check-then-write: the lock is made with the store's create-if-absent
(`OutputDir.create_exclusive`: link(2) of a complete file locally, PutObject with IfNoneMatch="*"
on S3, ifGenerationMatch=0 on GCS), so of drivers started in the same instant exactly one creates
it and the others find it held by a live driver.

Taking over a dead driver's lock is compare-and-delete, then the same create. A driver that judged
the lock it read dead deletes it only if it is still that version (`OutputDir.remove_if`: locally
the file is first renamed to a unique name, and of two renames of one file only one succeeds; on
S3 DeleteObject with IfMatch=<ETag>; on GCS ifGenerationMatch=<generation>). So of two drivers
that judged the same dead lock at most one deletes it, and both then compete in the exclusive
create: one proceeds, the other finds the winner's lock, alive, and refuses. Locally, a remover
whose rename caught a newer file than the one it judged (the winner's fresh lock) puts it back at
once; the name is free for those microseconds, so only a third driver starting in that very
instant could slip in. S3 and GCS decide on the server and have no such window.

The heartbeat rewrites the lock only while it still holds this driver's token (`replace_if`:
IfMatch=<ETag> on S3; read, compare, rename locally, two steps microseconds apart) and, once it
finds another driver's lock, logs an error and stops beating rather than write over it. A lock
deleted under its holder is written again by the next beat. Release deletes the lock only if it is
still ours.

A store without a conditional create (anything but local files, S3 and GCS, or an S3 store that
answers NotImplemented) makes the lock advisory: write, then read back, as before, and a warning
says so once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid

from prune.io.storage import InputError, OutputDir, Versioned, protocols_of

LOCK_FILE = "_lock.json"
HEARTBEAT_S = 30.0  # how often the holder refreshes its lock
STALE_S = 180.0  # a lock from another host with no heartbeat for this long is a dead driver's
_ACQUIRE_TRIES = 10  # each further try follows a change by another driver (a release, a takeover)
log = logging.getLogger("ssl_prune")
_warned_advisory: set[str] = set()  # protocols whose advisory lock was already warned about


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


def _describe(lock: dict | None) -> str:
    if lock is None:
        return "a driver whose lock cannot be read"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(lock.get("started", 0))))
    return f"pid {lock.get('pid')} on {lock.get('host')} (since {started})"


def _encode(me: dict) -> bytes:
    """This driver's lock as written, with a fresh heartbeat (each write's bytes differ)."""
    return json.dumps(me | {"beat": time.time()}, indent=2, sort_keys=True).encode()


def _decode(held: Versioned) -> dict | None:
    """The lock's fields; None if it is no lock we can read (damaged, or half written by O_EXCL)."""
    try:
        lock = json.loads(held.data)
    except ValueError:
        return None
    return lock if isinstance(lock, dict) else None


def _acquire(out: OutputDir, me: dict) -> None:
    """Create the lock, or take a dead driver's over; raise OutputLocked if a live one holds it."""
    for _ in range(_ACQUIRE_TRIES):
        if out.create_exclusive(_encode(me), LOCK_FILE):
            return
        held = out.read_versioned(LOCK_FILE)
        if held is None:
            continue  # released since: create it again
        other = _decode(held)
        if other is None:
            raise OutputLocked(f"output {out.url}: {LOCK_FILE} cannot be read (damaged, or being written by a "
                               "driver starting now); if no ssl-prune driver uses this output, delete it")
        if other.get("token") == me["token"]:
            return  # ours: a create that succeeded though its reply was lost
        if _alive(other):
            raise OutputLocked(f"output {out.url} is in use by another ssl-prune driver, {_describe(other)}; "
                               f"wait for it, or stop it (a dead driver's lock is taken over)")
        if out.remove_if(held.version, LOCK_FILE):
            log.warning("output %s: taking over the lock of a driver that is gone, %s", out.url, _describe(other))
        # else another driver removed or changed it first: look again
    raise OutputLocked(f"output {out.url}: the lock kept changing hands while this driver tried to take it")


def _warn_if_advisory(out: OutputDir) -> None:
    if out.conditional_writes_atomic:
        return
    protocol = protocols_of(out.fs)[0]
    if protocol not in _warned_advisory:
        _warned_advisory.add(protocol)
        log.warning("output %s: this store has no create-if-absent, so the output lock is advisory here: "
                    "two drivers started in the same instant could both proceed", out.url)


def _refresh(out: OutputDir, me: dict) -> bool:
    """Write a new heartbeat into our lock; False once another driver holds it (stop beating)."""
    held = out.read_versioned(LOCK_FILE)
    if held is None:  # deleted under us: ours again if nobody else has made one meanwhile
        if out.create_exclusive(_encode(me), LOCK_FILE):
            log.warning("output %s: the lock had been deleted; this driver wrote it again", out.url)
        return True  # not created: someone else's now, which the next beat finds
    other = _decode(held)
    if other is None or other.get("token") != me["token"]:
        log.error("output %s: the lock now belongs to %s (this driver was taken for dead); it stops "
                  "refreshing the lock and will not write over it, but two drivers may now be writing "
                  "this output", out.url, _describe(other))
        return False
    out.replace_if(_encode(me), held.version, LOCK_FILE)  # False: changed since read; the next beat looks
    return True


class HeldLock:
    """What `output_lock` yields: `check()` raises once another driver took the lock over (the
    run stops between stages instead of writing beside it)."""

    def __init__(self, out: OutputDir):
        self.out, self.lost = out, threading.Event()

    def check(self) -> None:
        if self.lost.is_set():
            raise OutputLocked(f"output {self.out.url}: another driver took the lock over (this one was taken for "
                               f"dead: no heartbeat for {STALE_S:.0f} s); stopping before the next stage")


def _beat(out: OutputDir, me: dict, stop: threading.Event, heartbeat_s: float, held: HeldLock) -> None:
    while not stop.wait(heartbeat_s):
        try:
            if not _refresh(out, me):
                held.lost.set()
                return
        except Exception:  # noqa: BLE001 - a missed beat is retried; the run goes on
            log.warning("output %s: could not refresh the lock", out.url)


def _release(out: OutputDir, me: dict) -> None:
    """Delete the lock if it is still ours (a driver that took it over keeps its own)."""
    try:
        held = out.read_versioned(LOCK_FILE)
        if held is not None and (_decode(held) or {}).get("token") == me["token"]:
            out.remove_if(held.version, LOCK_FILE)
    except Exception:  # noqa: BLE001 - a lock left behind names a dead driver: the next run takes it over
        log.warning("output %s: could not remove the lock; the next run will take it over", out.url)


@contextlib.contextmanager
def output_lock(out: OutputDir, heartbeat_s: float = HEARTBEAT_S):
    """Hold the output directory's lock for the duration of the block."""
    me = {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex, "started": time.time()}
    _acquire(out, me)
    _warn_if_advisory(out)
    stop = threading.Event()
    held = HeldLock(out)
    thread = threading.Thread(target=_beat, args=(out, me, stop, heartbeat_s, held), name="ssl-prune-lock", daemon=True)
    thread.start()
    try:
        yield held
    finally:
        stop.set()
        thread.join()
        _release(out, me)
