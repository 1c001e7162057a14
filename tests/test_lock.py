"""One driver per output directory: a live holder is refused by name, a dead one's lock taken over,
and of drivers that start in the same instant (locally and on S3, moto's server) exactly one proceeds.

The races run real driver processes (spawned: they import only the lock and storage code) that ask
for the lock at the same instant (a barrier, then a spin to a common clock time), round after round;
the parent prepares each round (e.g. a dead driver's lock).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from pipelines import lock
from pipelines.lock import LOCK_FILE, OutputLocked, output_lock
from prune.io.storage import OutputDir

ROUNDS = 30
S3_ROUNDS = 10  # moto answers a request in milliseconds: fewer rounds keep the test short
BUCKET = "ssl-prune-lock-test"


def _lock_bytes(**fields) -> bytes:
    base = {"host": socket.gethostname(), "pid": os.getpid(), "token": "x", "started": time.time(), "beat": time.time()}
    return json.dumps(base | fields).encode()


def _lock(path, **fields):
    """Write a lock as another driver would: whole (a reader never sees it half written)."""
    tmp = path / ".tmp-test-lock"
    tmp.write_bytes(_lock_bytes(**fields))
    os.replace(tmp, path / LOCK_FILE)


def _dead_pid() -> int:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    return gone.pid


def test_a_second_driver_is_refused_while_the_first_holds_the_lock(tmp_path):
    out = OutputDir(str(tmp_path))
    with output_lock(out):
        held = json.loads((tmp_path / LOCK_FILE).read_text())
        assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
        with pytest.raises(OutputLocked, match=rf"in use by another ssl-prune driver, pid {os.getpid()} on "):
            with output_lock(out):
                pass
    assert not (tmp_path / LOCK_FILE).exists()  # released


def test_the_lock_of_a_dead_driver_is_taken_over(tmp_path, caplog):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that no longer runs
    _lock(tmp_path, pid=gone.pid)
    with output_lock(OutputDir(str(tmp_path))):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert "taking over the lock of a driver that is gone" in caplog.text


def test_another_hosts_lock_counts_while_it_beats(tmp_path):
    _lock(tmp_path, host="other-node", pid=1, beat=time.time())
    with pytest.raises(OutputLocked, match="other-node"):
        with output_lock(OutputDir(str(tmp_path))):
            pass
    _lock(tmp_path, host="other-node", pid=1, beat=time.time() - 3600)  # no heartbeat for an hour
    with output_lock(OutputDir(str(tmp_path))):
        pass


def test_the_holder_refreshes_its_heartbeat(tmp_path):
    out = OutputDir(str(tmp_path))
    with output_lock(out, heartbeat_s=0.05):
        first = json.loads((tmp_path / LOCK_FILE).read_text())["beat"]
        deadline = time.time() + 5
        while json.loads((tmp_path / LOCK_FILE).read_text())["beat"] == first and time.time() < deadline:
            threading.Event().wait(0.05)
        assert json.loads((tmp_path / LOCK_FILE).read_text())["beat"] > first


# --- drivers racing for the lock ---------------------------------------------------------------


def _racer(url: str, rounds: int, barrier, start_at, outcomes) -> None:
    """A driver process: each round it asks for the lock at the same instant as the others and reports."""
    out = OutputDir(url)
    try:
        for _ in range(rounds):
            barrier.wait()  # the round is prepared
            time.sleep(max(0.0, start_at.value - time.monotonic() - 0.002))
            while time.monotonic() < start_at.value:  # spin the last 2 ms: sleeps end too unevenly
                pass
            try:
                with output_lock(out):
                    outcomes.put("held")
                    barrier.wait()  # keep it until every driver has tried
            except OutputLocked as exc:
                outcomes.put("refused" if "in use by another ssl-prune driver" in str(exc) else f"refused: {exc}")
                barrier.wait()
            barrier.wait()  # released: the parent may prepare the next round
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which fails the test
        outcomes.put(f"error: {exc!r}")
        barrier.abort()


def _race(url: str, prepare=lambda: None, rounds: int = ROUNDS, drivers: int = 2) -> list[list[str]]:
    """What each round's drivers got, sorted (["held", "refused"] when exactly one proceeded)."""
    ctx = multiprocessing.get_context("spawn")
    barrier, start_at, outcomes = ctx.Barrier(drivers + 1, timeout=60), ctx.Value("d", 0.0), ctx.Queue()
    procs = [ctx.Process(target=_racer, args=(url, rounds, barrier, start_at, outcomes)) for _ in range(drivers)]
    for p in procs:
        p.start()
    results = []
    try:
        for _ in range(rounds):
            prepare()
            start_at.value = time.monotonic() + 0.01  # one clock for every process on this host
            for _step in ("go", "tried", "released"):
                barrier.wait()
            results.append(sorted(outcomes.get(timeout=10) for _ in range(drivers)))
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return results


def test_of_two_drivers_started_at_once_exactly_one_proceeds(tmp_path):
    assert _race(str(tmp_path)) == [["held", "refused"]] * ROUNDS
    assert not (tmp_path / LOCK_FILE).exists()
    assert os.listdir(tmp_path) == []  # no temporary or set-aside file is left


def test_a_dead_drivers_lock_is_taken_over_by_exactly_one_of_two(tmp_path):
    dead = _dead_pid()
    assert _race(str(tmp_path), prepare=lambda: _lock(tmp_path, pid=dead)) == [["held", "refused"]] * ROUNDS
    assert os.listdir(tmp_path) == []


def _wait_for(condition, timeout_s: float = 5.0) -> None:
    deadline = time.time() + timeout_s
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.01)


def _just_after_a_beat(lock_file) -> None:
    """Return as soon as the heartbeat has rewritten the lock: the next beat is a whole period away,
    so what the test does now cannot fall between a beat's compare and its rename."""
    first = json.loads(lock_file.read_text())["beat"]
    _wait_for(lambda: json.loads(lock_file.read_text())["beat"] != first)


def test_the_heartbeat_never_writes_over_another_drivers_lock(tmp_path, caplog):
    out, lock_file = OutputDir(str(tmp_path)), tmp_path / LOCK_FILE
    with output_lock(out, heartbeat_s=0.2) as held:
        held.check()  # ours: the run goes on
        _just_after_a_beat(lock_file)
        _lock(tmp_path, host="other-node", pid=1, token="theirs")  # as a driver that took us for dead
        _wait_for(lambda: "now belongs to pid 1 on other-node" in caplog.text)
        time.sleep(0.5)  # beats would have come
        assert json.loads(lock_file.read_text())["token"] == "theirs"
        with pytest.raises(OutputLocked, match="another driver took the lock over"):
            held.check()  # the run stops before its next stage instead of writing beside the other
    assert json.loads(lock_file.read_text())["token"] == "theirs"  # release deletes only our own lock
    assert caplog.text.count("now belongs to") == 1  # it stopped beating


def test_a_lock_deleted_under_the_holder_is_written_again(tmp_path, caplog):
    out, lock_file = OutputDir(str(tmp_path)), tmp_path / LOCK_FILE
    with output_lock(out, heartbeat_s=0.2):
        _just_after_a_beat(lock_file)
        lock_file.unlink()
        _wait_for(lambda: "the lock had been deleted" in caplog.text)
        assert json.loads(lock_file.read_text())["pid"] == os.getpid()
    assert not lock_file.exists()


def test_an_unreadable_lock_is_refused_with_advice(tmp_path):
    (tmp_path / LOCK_FILE).write_text('{"host": "trunc')
    with pytest.raises(OutputLocked, match="cannot be read.*delete it"):
        with output_lock(OutputDir(str(tmp_path))):
            pass


def test_a_store_without_conditional_create_warns_that_the_lock_is_advisory(caplog, monkeypatch):
    monkeypatch.setattr(lock, "_warned_advisory", set())  # warned once per process: not yet in this test
    out = OutputDir("memory://ssl-prune-lock-test/advisory")
    assert not out.conditional_writes_atomic
    with output_lock(out):
        with pytest.raises(OutputLocked, match="in use by another"):
            with output_lock(out):
                pass
    with output_lock(out):
        pass
    assert caplog.text.count("the output lock is advisory here") == 1
    assert not out.exists(LOCK_FILE)


# --- the same on S3 (moto's server, which honours IfNoneMatch and IfMatch) -----------------------


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server with one bucket; AWS_* variables point this process and its children at it."""
    from .s3_server import s3_with_bucket

    with s3_with_bucket(BUCKET) as (_, fs):
        yield fs


def test_conditional_writes_on_s3(s3):
    out = OutputDir(f"s3://{BUCKET}/conditional")
    assert out.conditional_writes_atomic
    assert out.create_exclusive(b"one", "f") and not out.create_exclusive(b"two", "f")
    first = out.read_versioned("f")
    assert first.data == b"one" and first.version == s3.info(f"{BUCKET}/conditional/f")["ETag"]
    assert out.replace_if(b"three", first.version, "f") and not out.replace_if(b"four", first.version, "f")
    assert not out.remove_if(first.version, "f")  # IfMatch: an out-of-date ETag deletes nothing
    assert out.remove_if(out.read_versioned("f").version, "f")
    assert out.read_versioned("f") is None and not out.replace_if(b"x", first.version, "f")


def test_of_two_drivers_started_at_once_on_s3_exactly_one_proceeds(s3):
    url = f"s3://{BUCKET}/race"
    assert _race(url, rounds=S3_ROUNDS) == [["held", "refused"]] * S3_ROUNDS
    assert not s3.exists(f"{BUCKET}/race/{LOCK_FILE}")


def test_a_dead_drivers_lock_on_s3_is_taken_over_by_exactly_one_of_two(s3):
    dead, key = _dead_pid(), f"{BUCKET}/takeover/{LOCK_FILE}"

    def a_dead_drivers_lock():
        s3.pipe(key, _lock_bytes(pid=dead))

    assert _race(f"s3://{BUCKET}/takeover", a_dead_drivers_lock, rounds=S3_ROUNDS) == [["held", "refused"]] * S3_ROUNDS
    assert not s3.exists(key)


def test_the_heartbeat_never_writes_over_another_drivers_lock_on_s3(s3, caplog):
    out, key = OutputDir(f"s3://{BUCKET}/beat"), f"{BUCKET}/beat/{LOCK_FILE}"
    with output_lock(out, heartbeat_s=0.05):
        s3.pipe(key, _lock_bytes(host="other-node", pid=1, token="theirs"))
        _wait_for(lambda: "now belongs to pid 1 on other-node" in caplog.text)
        time.sleep(0.3)
        assert json.loads(s3.cat(key))["token"] == "theirs"
    assert json.loads(s3.cat(key))["token"] == "theirs"
