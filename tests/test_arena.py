"""Arena: accounting never exceeds the size, carving/recycling, mlock refusal paths, cgroup guard, close."""

import errno
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flexio import arena as arena_mod
from flexio.arena import Arena
from flexio.units import DIRECT_ALIGN as ALIGN
from flexio.errors import BudgetError, FlexioError

MiB = 1 << 20


def _check_invariants(a: Arena, live: list) -> None:
    s = a.statistics()
    assert 0 <= s.used <= s.size
    assert s.used == sum(b.reserved for b in live)
    assert s.buffers == len(live)
    spans = sorted((b.offset, b.offset + b.reserved) for b in live)
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert end <= start, "live buffers overlap"
    for b in live:
        assert b.address % ALIGN == 0 and b.offset + b.reserved <= s.size
        assert len(b.view) == b.nbytes


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 300_000), st.sampled_from([4096, 8192, 65536])), max_size=40))
def test_accounting_never_exceeds_size(ops):
    with Arena(2 * MiB + 100, lock=False) as a:
        assert a.size == 2 * MiB + 4096  # rounded up to a page
        live = []
        for is_free, n, align in ops:
            if is_free and live:
                live.pop(n % len(live)).release()
            else:
                try:
                    b = a.alloc(n, align=align)
                except BudgetError as e:
                    assert "cannot fit" in str(e) and "free of" in str(e)
                else:
                    assert b.address % align == 0
                    live.append(b)
            _check_invariants(a, live)
        for b in live:
            b.release()
        s = a.statistics()
        assert s.used == 0 and s.largest_free == s.size, "freeing everything must coalesce back to one extent"


def test_buffers_do_not_alias():
    with Arena(1 * MiB, lock=False) as a:
        x, y = a.alloc(5000), a.alloc(5000)
        x.view[:] = b"\x01" * 5000
        y.view[:] = b"\x02" * 5000
        assert bytes(x.view) == b"\x01" * 5000 and bytes(y.view) == b"\x02" * 5000
        assert y.offset - x.offset == 8192  # 5000 rounded up to 4096-alignment


def test_carve_and_recycle_slots():
    with Arena(16 * MiB, name="slots", lock=False) as a:
        slots = a.carve(4 * MiB, 4)
        assert a.statistics().used == 16 * MiB
        with pytest.raises(BudgetError, match="slots"):
            a.alloc(1)
        slots[1].release()
        again = a.alloc(4 * MiB)
        assert again.offset == 4 * MiB  # the freed slot is reused in place
        with pytest.raises(BudgetError):
            a.carve(4 * MiB, 2)  # all-or-nothing
        assert a.statistics().buffers == 4


def test_bad_sizes():
    with pytest.raises(BudgetError, match="positive"):
        Arena(0)
    with Arena(MiB, lock=False) as a:
        with pytest.raises(BudgetError, match="positive"):
            a.alloc(0)
        with pytest.raises(BudgetError, match="power of two"):
            a.alloc(10, align=3000)


def test_lock_and_close_leave_nothing_locked():
    before = arena_mod.locked_bytes()
    a = Arena(8 * MiB, name="locked")
    b = a.alloc(MiB)
    if not a.locked:
        pytest.skip("mlock refused in this environment (no CAP_IPC_LOCK and low RLIMIT_MEMLOCK)")
    assert arena_mod.locked_bytes() >= before + 8 * MiB
    a.close()
    assert b.released and a.closed
    assert arena_mod.locked_bytes() == before
    a.close()  # idempotent


def test_close_refuses_while_a_view_is_exported():
    a = Arena(MiB, lock=False)
    b = a.alloc(4096)
    arr = np.frombuffer(b.view, dtype=np.uint8)  # noqa: F841 - holds an export of the buffer
    with pytest.raises(FlexioError, match="still alive"):
        a.close()
    del arr
    a.close()
    assert a.closed


def test_mlock_refused_warns_once(monkeypatch, caplog):
    monkeypatch.setattr(arena_mod, "_mlock", lambda addr, n: errno.ENOMEM)
    monkeypatch.setattr(arena_mod, "_warned_unlocked", False)
    with caplog.at_level(logging.WARNING, logger="flexio.arena"):
        with Arena(MiB, name="w1") as a1, Arena(MiB, name="w2") as a2:
            assert not a1.locked and not a2.locked
            a1.alloc(4096)  # still usable, just unlocked
    msgs = [r.getMessage() for r in caplog.records if r.name == "flexio.arena" and r.levelno == logging.WARNING]
    assert len(msgs) == 1, msgs
    assert "UNLOCKED" in msgs[0] and "ulimit -l" in msgs[0]


def test_cgroup_limit_guard(monkeypatch):
    monkeypatch.setattr(arena_mod, "cgroup_memory_limit", lambda: 4 * MiB)
    with pytest.raises(BudgetError, match="cgroup memory limit"):
        Arena(64 * MiB, name="big")
    Arena(64 * MiB, name="unlocked", lock=False).close()  # the guard is about locking only


@pytest.mark.root
def test_real_rlimit_memlock_refusal():
    """Without CAP_IPC_LOCK and with a 64 KiB RLIMIT_MEMLOCK, mlock fails and the arena runs unlocked."""
    if os.geteuid() != 0 or not (shutil.which("setpriv") and shutil.which("prlimit")):
        pytest.skip("needs root with setpriv and prlimit to drop CAP_IPC_LOCK in a child")
    code = (
        "import logging; logging.basicConfig()\n"
        "from flexio.arena import Arena\n"
        "a = Arena(16 << 20)\nprint('locked', a.locked)\na.close()\n"
    )
    p = subprocess.run(
        ["setpriv", "--inh-caps=-ipc_lock", "--bounding-set=-ipc_lock", "prlimit", "--memlock=65536:65536",
         sys.executable, "-c", code],
        capture_output=True, text=True, timeout=60,
    )
    if p.returncode != 0 and "setpriv" in p.stderr:
        pytest.skip(f"setpriv not permitted here: {p.stderr.strip()}")
    assert p.returncode == 0, p.stderr
    assert "locked False" in p.stdout
    assert "RLIMIT_MEMLOCK" in p.stderr and "ulimit -l" in p.stderr
