"""One driver per output directory: a live holder is refused by name, a dead one's lock taken over."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from pipelines.lock import LOCK_FILE, OutputLocked, output_lock
from prune.io.storage import OutputDir


def _lock(path, **fields):
    base = {"host": socket.gethostname(), "pid": os.getpid(), "token": "x", "started": time.time(), "beat": time.time()}
    (path / LOCK_FILE).write_text(json.dumps(base | fields))


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
