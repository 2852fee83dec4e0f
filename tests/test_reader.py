"""Reader: bytes equal open().read() for random ranges on every backend, concurrency, cancellation, fallbacks, errors."""

import asyncio
import errno
import logging
import os
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flexio import reader as reader_mod
from flexio.arena import Arena
from flexio.errors import IOBackendError
from flexio.reader import Reader
from flexio.units import aligned_span

MiB = 1 << 20
SIZE = 3 * MiB + 1234  # not a multiple of 4096: the last block is partial
both_loops = pytest.mark.asyncio(loop_factories=["asyncio", "uvloop"])

# (backend, direct): every combination the reader can run in
MODES = [("io_uring", True), ("threads", True), ("io_uring", False), ("threads", False)]
mode_ids = ["uring-direct", "threads-direct", "uring-buffered", "threads-buffered"]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("reader") / "data.bin"
    data = os.urandom(SIZE)
    path.write_bytes(data)
    return str(path), data


@pytest.fixture
def arena():
    with Arena(16 * MiB, name="test") as a:
        yield a


def _open(path, backend, direct, **kw):
    r = Reader(path, backend=backend, direct=direct, **kw).open()
    if backend == "io_uring" and not r.backend.startswith("io_uring"):
        r.close()
        pytest.skip("io_uring unavailable here")
    return r


def test_aligned_span():
    assert aligned_span(0, 1) == (0, 4096)
    assert aligned_span(4095, 2) == (0, 8192)
    assert aligned_span(4096, 4096) == (4096, 4096)
    assert aligned_span(8224, 100) == (8192, 4096)  # a 32-byte-aligned GGUF tensor offset
    assert aligned_span(32, 0) == (0, 0)
    with pytest.raises(IOBackendError):
        aligned_span(-1, 10)


@pytest.mark.parametrize("backend,direct", MODES, ids=mode_ids)
def test_sync_random_ranges_match_file(data_file, arena, backend, direct):
    path, data = data_file
    buf = arena.alloc(4 * MiB)
    with _open(path, backend, direct, chunk_size=256 * 1024, queue_depth=4) as r:
        assert r.backend == f"{backend}+{'O_DIRECT' if direct else 'buffered'}"

        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
        @given(st.integers(0, SIZE - 1).flatmap(lambda o: st.tuples(st.just(o), st.integers(0, SIZE - o))))
        def check(rng):
            off, n = rng
            assert bytes(r.read_sync(off, n, buf)) == data[off : off + n]

        check()
        for off, n in [(SIZE - 1, 1), (0, SIZE), (SIZE, 0), (4096, 4096), (SIZE - 5000, 5000)]:
            assert bytes(r.read_sync(off, n, buf)) == data[off : off + n], (off, n)
        s = r.statistics()
        assert s.in_flight == 0 and s.requests > 0 and s.bytes_read > 0


@both_loops
@pytest.mark.parametrize("backend,direct", MODES, ids=mode_ids)
async def test_async_many_concurrent_reads(data_file, arena, backend, direct):
    path, data = data_file
    import random

    rnd = random.Random(1234)
    ranges = []
    for _ in range(48):
        off = rnd.randrange(SIZE)
        ranges.append((off, rnd.randrange(0, min(SIZE - off, 200_000) + 1)))
    ranges.append((SIZE - 1, 1))
    bufs = [arena.alloc(aligned_span(o, n)[1] or 4096) for o, n in ranges]
    async with _open(path, backend, direct, chunk_size=64 * 1024, queue_depth=3) as r:
        views = await asyncio.gather(*(r.read(o, n, b) for (o, n), b in zip(ranges, bufs)))
        for (o, n), v in zip(ranges, views):
            assert bytes(v) == data[o : o + n]
        del views
        s = r.statistics()
        assert s.in_flight == 0 and s.ranges == sum(1 for _, n in ranges if n)


@both_loops
async def test_read_ranges_batch_into_one_buffer(data_file, arena):
    path, data = data_file
    buf = arena.alloc(SIZE + 4096)
    async with Reader(path, chunk_size=128 * 1024, queue_depth=8) as r:
        # the whole file as 4096-aligned pieces into one buffer, last piece partial (EOF)
        step = 300 * 4096
        ranges = [(o, min(step, SIZE - o), buf.view[o : o + step + 4096]) for o in range(0, SIZE, step)]
        await r.read_ranges(ranges)
        assert bytes(buf.view[:SIZE]) == data
        await r.read_into(buf.view[:8192], 4096, 8192)
        assert bytes(buf.view[:8192]) == data[4096 : 4096 + 8192]


@both_loops
@pytest.mark.parametrize("backend", ["io_uring", "threads"])
async def test_cancellation_drains_and_unpins(data_file, backend):
    path, data = data_file
    a = Arena(8 * MiB, name="cancel")
    buf = a.alloc(SIZE + 4096)
    r = _open(path, backend, True, chunk_size=4096, queue_depth=2)
    try:
        task = asyncio.ensure_future(r.read_ranges([(0, SIZE, buf)]))
        await asyncio.sleep(0)  # let it submit
        assert r.statistics().in_flight > 0
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        s = r.statistics()
        assert s.in_flight == 0 and s.cancelled == 1 and not r._pending
        assert s.bytes_read < SIZE, "cancellation should stop most of the 800 chunks"
        # the reader still works after a cancellation
        assert bytes(await r.read(10, 100, buf)) == data[10:110]
    finally:
        r.close()
    buf.release()
    a.close()  # would raise if an in-flight read still pinned the buffer


def test_close_leaves_no_fd_or_thread(data_file, arena):
    path, data = data_file
    fds = set(os.listdir("/proc/self/fd"))
    threads = threading.active_count()
    buf = arena.alloc(MiB)
    for backend in ("io_uring", "threads"):
        with Reader(path, backend=backend, threads=4) as r:
            r.read_sync(0, 100_000, buf)
        assert r.backend == "closed"
    assert set(os.listdir("/proc/self/fd")) == fds
    assert threading.active_count() == threads


def test_fallback_when_io_uring_unavailable(data_file, arena, monkeypatch, caplog):
    path, data = data_file

    def no_uring(*a, **k):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(reader_mod, "_new_ring_engine", no_uring)
    with caplog.at_level(logging.WARNING, logger="flexio.reader"):
        with Reader(path) as r:
            assert r.backend == "threads+O_DIRECT"
            assert bytes(r.read_sync(5, 70_000, arena.alloc(MiB))) == data[5:70_005]
    lines = [x.getMessage() for x in caplog.records if x.name == "flexio.reader"]
    assert len(lines) == 1 and "io_uring unavailable" in lines[0] and "ENOSYS" in lines[0]
    with pytest.raises(IOBackendError, match="io_uring is unavailable"):
        Reader(path, backend="io_uring").open()


def test_fallback_when_io_uring_disabled_by_sysctl(data_file, monkeypatch, caplog):
    monkeypatch.setattr(reader_mod, "io_uring_disabled", lambda: 2)
    with caplog.at_level(logging.WARNING, logger="flexio.reader"):
        with Reader(data_file[0]) as r:
            assert r.backend.startswith("threads")
    assert any("io_uring_disabled" in x.getMessage() for x in caplog.records)


def test_fallback_when_filesystem_rejects_o_direct(data_file, arena, monkeypatch, caplog):
    path, data = data_file

    def no_direct(fd, size):
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(reader_mod, "_probe_direct", no_direct)
    advised = []
    real = os.posix_fadvise
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, o, n, adv: (advised.append(adv), real(fd, o, n, adv)))
    with caplog.at_level(logging.WARNING, logger="flexio.reader"):
        with Reader(path) as r:
            assert r.backend == "io_uring+buffered" or r.backend == "threads+buffered"
            assert bytes(r.read_sync(3, 10_000, arena.alloc(MiB))) == data[3:10_003]
    assert os.POSIX_FADV_DONTNEED in advised
    assert any("rejects O_DIRECT" in x.getMessage() for x in caplog.records)
    with pytest.raises(IOBackendError, match="O_DIRECT was required"):
        Reader(path, direct=True).open()


def test_short_reads_are_resubmitted(data_file, arena, monkeypatch):
    path, data = data_file
    real = reader_mod._ThreadEngine._read

    def short(self, view, offset):  # deliver at most 8 KiB per call
        return real(self, view[:8192], offset)

    monkeypatch.setattr(reader_mod._ThreadEngine, "_read", short)
    with Reader(path, backend="threads") as r:
        v = r.read_sync(100, 50_000, arena.alloc(MiB))
        assert bytes(v) == data[100:50_100]
        assert r.statistics().short_reads > 0


def test_bad_ranges_get_clear_errors(data_file, arena):
    path, _ = data_file
    buf = arena.alloc(MiB)
    with Reader(path) as r:
        with pytest.raises(IOBackendError, match="past EOF"):
            r.read_sync(SIZE - 10, 11, buf)
        with pytest.raises(IOBackendError, match="past EOF"):
            r.read_ranges_sync([(SIZE + 4096, 4096, buf)])
        with pytest.raises(IOBackendError, match=">= 0"):
            r.read_sync(-1, 10, buf)
        with pytest.raises(IOBackendError, match=">= 0"):
            r.read_ranges_sync([(0, -5, buf)])
        with pytest.raises(IOBackendError, match="4096-aligned"):
            r.read_ranges_sync([(100, 4096, buf)])
        with pytest.raises(IOBackendError, match="too small"):
            r.read_ranges_sync([(0, 8192, buf.view[:4096])])
        with pytest.raises(IOBackendError, match="aligned span"):
            r.read_sync(4000, 200, buf.view[:4096])
        assert r.statistics().in_flight == 0
    with pytest.raises(IOBackendError, match="cannot open"):
        Reader(path + ".missing").open()


def test_file_shrinking_under_the_reader(tmp_path, arena):
    p = tmp_path / "shrink.bin"
    p.write_bytes(os.urandom(64 * 1024))
    with Reader(str(p)) as r:
        os.truncate(p, 8192)
        with pytest.raises(IOBackendError, match="unexpected end of file|shrank"):
            r.read_sync(0, 64 * 1024, arena.alloc(MiB))


def test_registered_buffers(data_file):
    path, data = data_file
    with Arena(4 * MiB, name="fixed") as a, Reader(path, backend="io_uring", fixed_buffers=a) as r:
        if not r.backend.startswith("io_uring"):
            pytest.skip("io_uring unavailable")
        assert r.statistics().fixed_buffers
        b = a.alloc(2 * MiB)
        assert bytes(r.read_sync(777, MiB, b)) == data[777 : 777 + MiB]
        del b


def test_gguf_tensor_through_aligned_span(arena, smollm2_path):
    from flexio.gguf import open_gguf

    path = smollm2_path
    g = open_gguf(path)
    ts = [t for t in g.tensors if t.offset % 4096 and t.nbytes < 8 * MiB][:3] + g.layer_tensors(0)[:2]
    with Reader(path) as r:
        for t in ts:
            start, n = aligned_span(t.offset, t.nbytes)
            with arena.alloc(n) as buf:
                v = r.read_sync(t.offset, t.nbytes, buf)
                assert bytes(v) == g.read_tensor_bytes(t).tobytes(), t.name
                del v
