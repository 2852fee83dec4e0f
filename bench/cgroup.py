"""Benchmark children -> cgroup v1 memory cgroups (the paper's small-device setting) and a cold page cache.

As root, `/sys/fs/cgroup/memory/<name>/memory.limit_in_bytes` confines a child process's
memory, page cache included: a model larger than the limit is re-read from the disk on every
pass by an mmap-based engine. Cgroups are named flexio-<kind>-<pid>[-<n>] after the process
that made them, so ones left behind by a killed run are recognised and removed by the next.
Runtime code never creates cgroups: it only reads its own limit (flexio.arena).
"""

from __future__ import annotations

import os
import time

CGROUP_V1_MEMORY = "/sys/fs/cgroup/memory"


def cgroup_unavailable() -> str | None:
    if not os.path.isdir(CGROUP_V1_MEMORY):
        return f"no cgroup v1 memory hierarchy at {CGROUP_V1_MEMORY}"
    if not os.access(CGROUP_V1_MEMORY, os.W_OK):
        return f"{CGROUP_V1_MEMORY} is not writable (needs root)"
    return None


def _remove_stale_cgroups() -> None:
    """rmdir flexio's cgroups left by killed runs, or whose rmdir timed out: named
    flexio-<kind>-<pid>[-<n>] after a process that no longer exists."""
    try:
        names = os.listdir(CGROUP_V1_MEMORY)
    except OSError:
        return
    for name in names:
        parts = name.split("-")
        pid = parts[2] if len(parts) > 2 else ""
        if parts[0] == "flexio" and pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            try:
                os.rmdir(os.path.join(CGROUP_V1_MEMORY, name))
            except OSError:
                pass


def _read_int(path: str) -> int | None:
    try:
        with open(path) as fh:
            return int(fh.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


class MemCgroup:
    """A cgroup v1 memory cgroup `name` (flexio-<kind>-<pid>[-<n>]) with a memory limit, removed on
    close (a context manager); ones that earlier runs could not remove go when the next is made."""

    def __init__(self, name: str, limit: int):
        _remove_stale_cgroups()
        self.name = name
        self.path = os.path.join(CGROUP_V1_MEMORY, name)
        os.mkdir(self.path)
        try:
            with open(self.file("memory.limit_in_bytes"), "w") as fh:
                fh.write(str(limit))
        except OSError:
            os.rmdir(self.path)
            raise

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def read_int(self, name: str) -> int | None:
        return _read_int(self.file(name))

    def join_fn(self):
        """A preexec_fn that moves the child into this cgroup (between fork and exec)."""
        procs = self.file("cgroup.procs")

        def join() -> None:
            with open(procs, "w") as fh:
                fh.write(str(os.getpid()))

        return join

    def close(self) -> None:
        for _ in range(50):  # an exited child may take a moment to leave the cgroup
            try:
                os.rmdir(self.path)
                return
            except OSError:
                time.sleep(0.1)

    def __enter__(self) -> "MemCgroup":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def drop_caches() -> bool:
    """sync, then drop the page cache (root only); False when that is not allowed."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3")
        return True
    except OSError:
        return False


