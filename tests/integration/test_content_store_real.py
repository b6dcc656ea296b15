"""cocon.content with real processes: writers that die mid-write, and the store lock between gc,
commits and leases held by other processes."""

from __future__ import annotations

import os
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cocon.content import ContentStore
from cocon.oci.digest import Digest, sha256_of


def fork(fn: Callable[[], None]) -> int:
    """Run `fn` in a forked child that always leaves with os._exit (status 0 if fn returned)."""
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            fn()
            status = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(status)
    return pid


def wait_exit(pid: int, timeout: float = 30.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError(f"child {pid} did not exit within {timeout}s")


class Pipe:
    """A one-way byte channel between parent and child."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe()

    def send(self, data: bytes = b".") -> None:
        os.write(self.w, data)

    def recv(self, timeout: float = 30.0) -> bytes:
        import select

        ready, _, _ = select.select([self.r], [], [], timeout)
        assert ready, "timed out waiting for the other process"
        return os.read(self.r, 1)

    def close(self) -> None:
        for fd in (self.r, self.w):
            try:
                os.close(fd)
            except OSError:
                pass


@pytest.fixture
def pipes() -> Iterator[Callable[[], Pipe]]:
    made: list[Pipe] = []

    def make() -> Pipe:
        p = Pipe()
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


@pytest.fixture
def root(tmp_path: Path) -> str:
    return str(tmp_path / "content")


def ingest(root: str) -> list[str]:
    return os.listdir(os.path.join(root, "ingest"))


def test_writer_process_exits_mid_write(root: str, pipes: Callable[[], Pipe]) -> None:
    data = os.urandom(1 << 20)
    ready = pipes()

    def child() -> None:
        w = ContentStore(root).writer(expected=sha256_of(data), expected_size=len(data))
        w.write(data[: len(data) // 2])
        ready.send()
        os._exit(0)  # no finally, no finalizers: as if the process died

    pid = fork(child)
    ready.recv()
    assert wait_exit(pid) == 0
    store = ContentStore(root)  # a fresh open keeps young leftovers: they may belong to a live writer
    assert store.list() == [] and not store.exists(sha256_of(data))
    assert len(ingest(root)) == 1
    assert os.path.getsize(os.path.join(root, "ingest", ingest(root)[0])) == len(data) // 2
    assert store.clean_ingest() == []  # younger than an hour
    removed = store.clean_ingest(older_than=0)  # the dead writer's lock is gone
    assert len(removed) == 1 and ingest(root) == []
    assert store.put(data) == sha256_of(data)  # and the blob can be written again


def test_writer_process_killed_mid_write(root: str) -> None:
    ContentStore(root)

    def child() -> None:
        store = ContentStore(root)
        w = store.writer()
        chunk = os.urandom(64 * 1024)
        while True:
            w.write(chunk)

    pid = fork(child)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        names = ingest(root)
        if names and os.path.getsize(os.path.join(root, "ingest", names[0])) > (1 << 20):
            break
        time.sleep(0.01)
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise AssertionError("the child never wrote")
    os.kill(pid, signal.SIGKILL)
    status = wait_exit(pid)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    store = ContentStore(root)
    assert store.list() == [] and os.listdir(os.path.join(root, "blobs", "sha256")) == []
    assert len(ingest(root)) == 1
    # an hour later, opening the store cleans up
    leftover = os.path.join(root, "ingest", ingest(root)[0])
    os.utime(leftover, (time.time() - 7200, time.time() - 7200))
    ContentStore(root)
    assert ingest(root) == []


def test_clean_ingest_leaves_a_live_writer_in_another_process_alone(
    root: str, pipes: Callable[[], Pipe]
) -> None:
    ready, done = pipes(), pipes()

    def child() -> None:
        w = ContentStore(root).writer()
        w.write(b"slow producer, part 1; ")
        ready.send()
        done.recv()
        w.write(b"part 2")
        w.commit()

    pid = fork(child)
    ready.recv()
    store = ContentStore(root)
    assert store.clean_ingest(older_than=0) == []  # locked by the live writer
    done.send()
    assert wait_exit(pid) == 0
    assert store.read(sha256_of(b"slow producer, part 1; part 2")) == b"slow producer, part 1; part 2"
    assert ingest(root) == []


def test_gc_waits_for_a_lease_in_another_process(root: str, pipes: Callable[[], Pipe]) -> None:
    store = ContentStore(root)
    garbage = store.put(b"garbage")
    roots_file = Path(root, "roots")
    roots_file.write_text("")
    data = b"an image being imported"
    ready, go = pipes(), pipes()

    def importer() -> None:
        s = ContentStore(root)
        with s.lease():
            s.put(data)  # written, not yet referenced by any root
            ready.send()
            go.recv()
            roots_file.write_text(str(sha256_of(data)))  # recorded before the lease ends

    pid = fork(importer)
    ready.recv()
    result: list[list[Digest]] = []
    gc_thread = threading.Thread(
        target=lambda: result.append(
            store.gc(lambda: [roots_file.read_text()] if roots_file.read_text() else [])
        )
    )
    gc_thread.start()
    time.sleep(0.3)
    assert gc_thread.is_alive(), "gc must wait for the lease"
    assert store.exists(garbage)
    go.send()
    gc_thread.join(30)
    assert wait_exit(pid) == 0
    assert result == [[garbage]]
    assert store.list() == [sha256_of(data)]


def test_commit_waits_for_gc_in_another_process(root: str, pipes: Callable[[], Pipe]) -> None:
    store = ContentStore(root)
    in_gc, finish = pipes(), pipes()

    def collector() -> None:
        def roots() -> list[Digest]:
            in_gc.send()
            finish.recv()  # hold the exclusive lock until told
            return []

        ContentStore(root).gc(roots)

    pid = fork(collector)
    in_gc.recv()
    data = os.urandom(256 * 1024)
    committed: list[Digest] = []
    put_thread = threading.Thread(target=lambda: committed.append(store.put(data)))
    put_thread.start()
    time.sleep(0.3)
    assert put_thread.is_alive(), "commit must wait for gc"
    assert not store.exists(sha256_of(data))  # written and synced in ingest/, not yet visible
    assert len(ingest(root)) == 1
    finish.send()
    assert wait_exit(pid) == 0
    put_thread.join(30)
    assert committed == [sha256_of(data)]
    store.verify(committed[0])  # gc ran first and could not see (or delete) it
    assert ingest(root) == []


def test_concurrent_writers_of_the_same_blob(root: str, pipes: Callable[[], Pipe]) -> None:
    ContentStore(root)
    data = os.urandom(2 << 20)
    start = pipes()

    def writer() -> None:
        start.recv()
        s = ContentStore(root)
        for _ in range(5):
            assert s.put_stream(_chunks(data), expected=sha256_of(data)) == sha256_of(data)

    pids = [fork(writer) for _ in range(4)]
    start.send(b"go!!")  # one byte each
    assert [wait_exit(pid) for pid in pids] == [0, 0, 0, 0]
    store = ContentStore(root)
    assert store.list() == [sha256_of(data)]
    store.verify(sha256_of(data))
    assert ingest(root) == []


class _chunks:
    """A reader that returns short reads, as pipes and sockets do."""

    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)

    def read(self, size: int, /) -> bytes:
        n = min(size, 100_003)
        out, self.data = self.data[:n], self.data[n:]
        return bytes(out)


def test_writers_survive_a_clean_ingest_racing_them(root: str, pipes: Callable[[], Pipe]) -> None:
    """clean_ingest(older_than=0) in a tight loop never takes a live writer's file."""
    ContentStore(root)
    started = pipes()

    stop = os.path.join(os.path.dirname(root), "stop-cleaning")

    def cleaner() -> None:
        s = ContentStore(root)
        started.send()
        end = time.monotonic() + 60  # a bound, in case the parent dies
        while time.monotonic() < end and not os.path.exists(stop):
            s.clean_ingest(older_than=0)

    pid = fork(cleaner)
    started.recv()
    store = ContentStore(root)
    written: list[tuple[Digest, bytes]] = []
    try:
        while len(written) < 200:  # a count, not a time: a loaded machine must not make it pass vacuously
            data = f"blob {len(written)}".encode()
            with store.writer() as w:
                w.write(data[:3])
                w.write(data[3:])
                written.append((w.commit(), data))
        assert os.waitpid(pid, os.WNOHANG)[0] == 0, "the cleaner stopped before the writers were done"
    finally:
        open(stop, "w").close()
        os.waitpid(pid, 0)
    for d, data in written:
        assert store.read(d) == data
    assert ingest(root) == []
