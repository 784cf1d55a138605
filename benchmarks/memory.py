"""Peak memory of this process's tree, measured the way the peer benchmark (shared/peers) measures it.

The sum of PSS (proportional set size: a page shared by N processes counts 1/N in each) over this process
and every process below it (Pool workers, Dask workers and their nannies' processes, the resource
tracker), sampled from /proc in a background thread. RSS would count the shared libraries of every
worker again; PSS adds up to what the tree really holds. Linux only: elsewhere the peak reads as NaN.

    with TreeMemory() as mem:
        run_something()
    print(f"{mem.peak_mb:.0f} MB")
"""

from __future__ import annotations

import os
import threading


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as fh:
                stat = fh.read()
        except OSError:  # gone since the listing
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        kids.setdefault(ppid, []).append(int(name))
    return kids


def _pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_pss_mb(root: int | None = None) -> float:
    """The sum of PSS of ``root`` (this process) and all its descendants, in MB."""
    root = os.getpid() if root is None else root
    kids = _children()
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        total += _pss_kb(pid)
        stack.extend(kids.get(pid, []))
    return total / 1024


class TreeMemory:
    """Samples :func:`tree_pss_mb` every ``interval`` seconds while the block runs; ``peak_mb`` is the largest."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self.supported = os.path.exists("/proc/self/smaps_rollup")
        self.peak_mb = 0.0 if self.supported else float("nan")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while True:
            self.peak_mb = max(self.peak_mb, tree_pss_mb())
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> TreeMemory:
        if self.supported:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread.is_alive():
            self._stop.set()
            self._thread.join()
            self.peak_mb = max(self.peak_mb, tree_pss_mb())
