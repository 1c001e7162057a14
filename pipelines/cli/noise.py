"""Keep Ray's own console noise off the terminal unless `--verbose`.

Python loggers can be quieted by level, but Ray's C++ core worker writes its ERROR lines straight
to the process's stderr (file descriptor 2), whatever its Python logging says. One of them comes
with every Ray Data actor pool and means nothing to a user: "Actor ... has constructor arguments
in the object store and max_restarts > 0" (Ray Data passes its context and the map function by
reference). `StderrFilter` puts a pipe in front of fd 2 and a thread that forwards every byte except
whole lines matching a known-noise pattern; everything else (tracebacks, progress bars, warnings)
passes through unchanged, at once.
"""

from __future__ import annotations

import atexit
import faulthandler
import logging
import os
import re
import threading

# Whole lines that are noise to a user, with why each is safe to hide.
NOISE = (
    # Ray Data's actor pools always pass their constructor arguments by reference
    re.compile(rb"^\[[^\]]*\] core_worker\.cc:\d+: Actor with class name: .* has constructor arguments in the object store"),
)
# Loggers whose lines are notices, not problems, for a user of this tool (shown with --verbose)
QUIET_LOGGERS = (
    "ray._private.authentication.authentication_token_setup",  # "Token authentication is enabled ..."
)
_HOLD_AT_MOST = 4096  # bytes of a partial line held back, waiting for its end


class StderrFilter:
    """Drops whole lines of fd 2 that match `patterns`; forwards the rest as it arrives."""

    def __init__(self, patterns=NOISE):
        self.patterns = patterns
        self.dropped = 0
        self._real = self._thread = None

    def start(self) -> "StderrFilter":
        self._real = os.dup(2)
        read_end, write_end = os.pipe()
        os.dup2(write_end, 2)
        os.close(write_end)
        # a hard crash kills the forwarding thread too: its dump goes straight to the terminal
        faulthandler.enable(file=self._real)
        self._thread = threading.Thread(target=self._forward, args=(read_end,), name="stderr-filter", daemon=True)
        self._thread.start()
        atexit.register(self.stop)
        return self

    def stop(self) -> None:
        """Restore fd 2 and forward what is still in the pipe (at exit, or when a test is done)."""
        if self._real is None:
            return
        os.dup2(self._real, 2)  # the pipe's last write end closes: the thread reads to its end
        self._thread.join(timeout=5)
        os.close(self._real)
        self._real = None

    def _keep(self, line: bytes) -> bool:
        if any(p.search(line) for p in self.patterns):
            self.dropped += 1
            return False
        return True

    def _forward(self, fd: int) -> None:
        held = b""  # the start of a line that may yet turn out to be noise
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            data, out = held + chunk, []
            *lines, held = data.split(b"\n")
            out += [line + b"\n" for line in lines if self._keep(line)]
            # a partial line is held only while it may be one of Ray's C++ log lines ("[2026-...");
            # progress bars redraw with \r and no newline: they go out at once
            if held and not (held.startswith(b"[") and b"\r" not in held and len(held) < _HOLD_AT_MOST):
                out.append(held)
                held = b""
            if out:
                os.write(self._real, b"".join(out))
        if held:
            os.write(self._real, held)
        os.close(fd)


def hide_ray_noise() -> StderrFilter:
    """What the CLI does without --verbose: quiet notice loggers and filter fd 2."""
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    return StderrFilter().start()
