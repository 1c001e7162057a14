"""CPU time of this machine and of this process tree, read from /proc: the benchmarks measure the
rates the capacity plan uses, on a shared 2-core machine where wall time alone misleads."""

from __future__ import annotations

import collections
import os


def cpu_seconds() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine incl. steal, CPU seconds of this process and its
    live descendants, e.g. Ray workers). Their difference over a variant is what other
    processes took from it: this machine is shared, and on 2 cores that matters."""
    tick = os.sysconf("SC_CLK_TCK")
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    busy = sum(v) - v[3] - v[4]
    procs = {}
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        procs[int(d)] = (int(fields[1]), int(fields[11]) + int(fields[12]))  # ppid, utime + stime
    children = collections.defaultdict(list)
    for pid, (ppid, _) in procs.items():
        children[ppid].append(pid)
    own, todo = 0, [os.getpid()]
    while todo:
        pid = todo.pop()
        own += procs.get(pid, (0, 0))[1]
        todo += children[pid]
    return busy / tick, own / tick
