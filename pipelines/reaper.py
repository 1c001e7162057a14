"""The local Ray a driver started dies with the driver, however the driver ends.

`ray.init()` starts a raylet, a GCS and their agents as the driver's children. Killed with SIGKILL
(an OOM kill, a cancelled CI job), the driver cannot shut them down: the raylet and GCS notice and
exit, but the dashboard and runtime-env agents then wait about a minute trying to report to the
dead GCS. `watch(session_dir)` starts a small process in a session of its own, holding a pipe from
the driver: when the pipe closes (the driver is gone, cleanly or not) it kills every process that
still has a file open under the driver's Ray session directory, the signature of that Ray alone.

    python -m pipelines.reaper SESSION_DIR      (stdin: the driver's end of the pipe)
"""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time

GRACE_S = 1.0  # after the driver: Ray's own shutdown gets this long first


def session_processes(session_dir: str, exclude: int) -> set[int]:
    """Pids with an open file (or working directory) under `session_dir`."""
    root = os.path.realpath(session_dir) + os.sep
    found = set()
    for proc in glob.glob("/proc/[0-9]*"):
        pid = int(proc.rsplit("/", 1)[1])
        if pid == exclude:
            continue
        try:
            links = [os.readlink(f) for f in glob.glob(f"{proc}/fd/*")] + [os.readlink(f"{proc}/cwd")]
        except OSError:
            continue
        if any(link.startswith(root) for link in links):
            found.add(pid)
    return found


def reap(session_dir: str) -> int:
    """Kill what is left of the session; -> how many processes were killed."""
    time.sleep(GRACE_S)
    killed = 0
    for _ in range(3):  # a worker may be forked while the others go
        pids = session_processes(session_dir, os.getpid())
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except OSError:
                pass
        if not pids:
            break
        time.sleep(0.2)
    return killed


def watch(session_dir: str) -> subprocess.Popen | None:
    """Start the reaper of `session_dir` (Linux only); it lives until this process ends."""
    if not sys.platform.startswith("linux"):
        return None
    return subprocess.Popen([sys.executable, "-m", "pipelines.reaper", session_dir], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            close_fds=True)


def main() -> None:
    session_dir = sys.argv[1]
    while sys.stdin.buffer.read(65536):  # EOF: the driver's end closed, by exit or by death
        pass
    reap(session_dir)


if __name__ == "__main__":
    main()
