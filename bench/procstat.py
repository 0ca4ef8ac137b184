"""CPU time of processes from /proc (Linux): what each process of a benchmark spent per job.

`/proc/<pid>/stat` counts user and system time in clock ticks; a process's children are counted
separately (found by their parent PID), so a prefork pool's workers show up under their master.
"""

from __future__ import annotations

import os
from pathlib import Path

_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) is in parentheses and may hold spaces: split after its closing one.
    return text[text.rindex(")") + 2:].split()


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of `pid` itself (0 once it is gone)."""
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICKS_PER_S  # utime, stime (fields 14 and 15)


def descendants(pid: int) -> list[int]:
    """The PIDs of every living process below `pid`, found through their parents."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat_fields(int(entry.name))) is not None:
            parents[int(entry.name)] = int(fields[1])
    found: list[int] = []
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        children = [child for child, ppid in parents.items() if ppid == parent]
        found += children
        frontier += children
    return found


def tree_cpu_s(pid: int) -> float:
    """CPU seconds of `pid` and every living process below it."""
    return sum(cpu_s(p) for p in [pid, *descendants(pid)])
