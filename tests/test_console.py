"""The console without --verbose: Ray's C++ noise lines dropped from fd 2, everything else intact."""

from __future__ import annotations

import subprocess
import sys

from .conftest import REPO, subprocess_env

# A child process that writes to fd 2 as Ray's core worker does (C++, below Python's sys.stderr),
# beside Python's own writes, a progress bar redrawn with \r and no newline, and a traceback.
CHILD = r'''
import os, sys, time
from pipelines.cli.noise import StderrFilter
f = StderrFilter().start()
os.write(2, b"[2026-11-26 05:39:27,171 E 31516 31516] core_worker.cc:2465: Actor with class name: "
            b"'MapWorker(MapBatches(EmbedActor))' and ID: 'ab' has constructor arguments in the object store "
            b"and max_restarts > 0. If the arguments in the object store go out of scope...\n")
os.write(2, b"[2026-11-26 05:39:27,200 E 31516 31516] core_worker.cc:99: a real error of Ray's\n")
sys.stderr.write("bar:  50%|#####     |\r"); sys.stderr.flush()
time.sleep(0.3)
os.write(2, b"[2026-11-26 05:39:28,000 E 1 1] core_worker.cc:2465: Actor with class name: 'X' has constructor ")
time.sleep(0.3)
os.write(2, b"arguments in the object store and max_restarts > 0.\n")
print("stdout is untouched")
raise SystemExit("exit message on stderr")
'''


def test_filter_drops_only_the_known_noise_and_keeps_order():
    res = subprocess.run([sys.executable, "-c", CHILD], cwd=REPO, env=subprocess_env(), capture_output=True,
                         timeout=60)
    assert res.returncode == 1
    assert b"constructor arguments" not in res.stderr  # also when its line arrives in two writes
    lines = res.stderr.split(b"\n")
    assert lines[0].endswith(b"core_worker.cc:99: a real error of Ray's")  # other C++ lines pass
    assert lines[1] == b"bar:  50%|#####     |\rexit message on stderr"  # the bar, then the exit message
    assert res.stdout == b"stdout is untouched\n"


def test_a_partial_line_goes_out_before_its_end_arrives():
    """A progress bar's redraw (\r, no newline) must reach the terminal while the job runs."""
    child = r'''
import os, sys, time
from pipelines.cli.noise import StderrFilter
StderrFilter().start()
sys.stderr.write("bar: 10%\r"); sys.stderr.flush()
time.sleep(30)
'''
    proc = subprocess.Popen([sys.executable, "-c", child], cwd=REPO, env=subprocess_env(), stderr=subprocess.PIPE)
    try:
        assert proc.stderr.read(len("bar: 10%\r")) == b"bar: 10%\r"  # read before the child ends
    finally:
        proc.kill()
        proc.wait()
