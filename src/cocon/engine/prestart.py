"""Pre-started runtimes: a conmon and its `cocon-runtime create --await FIFO` launched before the
container that will use them is asked for.

A detached start (every start through the daemon) is conmon → `cocon-runtime create`: two execs,
and a Python interpreter that imports the runtime, ~15 ms before the runtime does any work. The
daemon keeps one such pair ready (`Pool`, size 1): conmon is running, the runtime has imported
everything and blocks reading its FIFO. `Supervisor.create` hands the pair's container ID to a new
container whose shape fits (no TTY, no stdin, no log size limit: what `docker run --rm IMAGE CMD`
and `cocon run` without -i/-t ask for), and `Supervisor.start` writes the bundle's config.json and
says `go`: the runtime reads the bundle and creates the container as it would have cold. Then the
pool launches the next pair in a background thread.

Only the daemon enables a pool (`enable`); the in-process engine starts cold. A pair that is never
used is cancelled (`cancel`: the runtime reads a line that is not `go`, fails, conmon exits), when
its container is removed before it started, and when the daemon stops. A daemon that was killed
leaves its pairs waiting: the next one cancels every FIFO under `$COCON_RUN/instances` whose
container is not running (`cancel_leftovers`).
"""

from __future__ import annotations

import os
import threading

from cocon._typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cocon.engine.engine import Engine
    from cocon.engine.supervisor import ConmonLaunch

FIFO_NAME = "start.fifo"
REFILL_DELAY = 0.2  # s after a pair's use: a short `run --rm` has ended by then
READY_TIMEOUT = 30.0  # s for a new pair's runtime to be waiting (else it is not offered)
GO_TIMEOUT = 5.0  # s for a reserved pair's runtime to be there when its container starts
_pools: dict[str, Pool] = {}
_pools_lock = threading.Lock()


class Prestarted:
    """One ready pair: the container ID it was launched for, its bundle and its start FIFO."""

    def __init__(self, cid: str, bundle: str, launch: ConmonLaunch) -> None:
        self.cid = cid
        self.bundle = bundle
        self.fifo = os.path.join(bundle, FIFO_NAME)
        self.launch = launch

    def waiting(self, timeout: float) -> bool:
        """Wait (at most `timeout` s) until the runtime reads its FIFO: it has imported everything
        and joined the container's cgroup then. False if it does not come (it failed or was killed)."""
        import time

        deadline = time.monotonic() + timeout
        while True:
            try:
                os.close(os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC))
                return True  # (the runtime holds the FIFO read-write: this open and close tell it nothing)
            except OSError:  # ENXIO: no reader yet
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.005)

    def signal(self, word: bytes, timeout: float = 0.0) -> bool:
        """Write `word` to the waiting runtime (waiting at most `timeout` s for it to be there);
        False when no runtime waits."""
        if timeout > 0 and not self.waiting(timeout):
            return False
        try:
            fd = os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:  # ENXIO: no reader (the runtime is gone); ENOENT: the bundle is gone
            return False
        try:
            os.write(fd, word + b"\n")
            return True
        except OSError:
            return False
        finally:
            os.close(fd)

    def go(self) -> bool:
        return self.signal(b"go", timeout=GO_TIMEOUT)

    def cancel(self) -> None:
        """Stop the pair and remove what it left (its bundle, a log directory, an exit file)."""
        self.signal(b"cancel")
        self.launch.close()


class Pool:
    """The ready pairs of one engine's run directory (see the module docstring)."""

    def __init__(self, root: str, run_dir: str, size: int = 1) -> None:
        self.root = root
        self.run_dir = run_dir
        self.size = size
        self._ready: list[Prestarted] = []
        self._claimed: dict[str, Prestarted] = {}
        self._lock = threading.Lock()
        self._filling = False
        self._closed = False
        self._threads: list[threading.Thread] = []  # fill threads and refill timers, for close

    def _engine(self) -> Engine:
        from cocon.engine.engine import Engine

        return Engine(self.root, self.run_dir)

    # --- use -----------------------------------------------------------------------------------------
    def take(self) -> str | None:
        """A container ID whose runtime is ready (reserved for the caller), or None."""
        with self._lock:
            entry = self._ready.pop(0) if self._ready else None
            if entry is not None:
                self._claimed[entry.cid] = entry
        if entry is None:
            self.fill_later()
        # else: refilled once this one started (`started`): a new pair's start-up would compete
        # for the CPU with the start it is meant to speed up
        return entry.cid if entry is not None else None

    def claimed(self, cid: str) -> Prestarted | None:
        """The pair reserved for container `cid` (taken out of the pool for good)."""
        with self._lock:
            return self._claimed.pop(cid, None)

    def started(self) -> None:
        """A pair was used (its container runs, or failed to): launch the next one a moment later,
        once the client that started it has its answer (`REFILL_DELAY`)."""
        timer = threading.Timer(REFILL_DELAY, self.fill_later)
        timer.daemon = True
        self._track(timer)
        timer.start()

    def _track(self, thread: threading.Thread) -> None:
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)

    def release(self, cid: str) -> None:
        """Container `cid` goes without starting: cancel its pair."""
        entry = self.claimed(cid)
        if entry is not None:
            _cancel_and_clean(entry, self.run_dir, self.root)
            self.fill_later()

    # --- filling -------------------------------------------------------------------------------------
    def fill_later(self) -> None:
        with self._lock:
            if self._filling or self._closed or len(self._ready) >= self.size:
                return
            self._filling = True
        thread = threading.Thread(target=self._fill, name="cocon-prestart", daemon=True)
        self._track(thread)
        thread.start()

    def _fill(self) -> None:
        try:
            engine = self._engine()
            try:
                while True:
                    with self._lock:
                        if self._closed or len(self._ready) >= self.size:
                            return
                    entry = launch_pair(engine)
                    if not entry.waiting(READY_TIMEOUT):  # its runtime failed: nothing to offer
                        _cancel_and_clean(entry, self.run_dir, self.root)
                        return
                    with self._lock:
                        if self._closed:
                            _cancel_and_clean(entry, self.run_dir, self.root)
                            return
                        self._ready.append(entry)
            finally:
                engine.close()
        except Exception:  # a start will go cold: nothing is lost
            return
        finally:
            with self._lock:
                self._filling = False

    def close(self) -> None:
        """Cancel every pair; a launch in progress finishes first (then cancels its pair itself), so
        that no conmon is left waiting when the daemon's process ends."""
        with self._lock:
            self._closed = True
            threads = list(self._threads)
        for thread in threads:
            if isinstance(thread, threading.Timer):
                thread.cancel()
            thread.join(timeout=10)
        with self._lock:
            entries = self._ready + list(self._claimed.values())
            self._ready, self._claimed = [], {}
        for entry in entries:
            _cancel_and_clean(entry, self.run_dir, self.root)


def launch_pair(engine: Engine) -> Prestarted:
    """conmon + `cocon-runtime create --await` for a new container ID."""
    from cocon.engine.supervisor import launch_conmon

    sup = engine.supervisor
    cid = os.urandom(32).hex()
    bundle = sup.bundle(cid)
    os.makedirs(bundle, 0o700, exist_ok=True)
    os.makedirs(sup.log_dir(cid), 0o700, exist_ok=True)
    fifo = os.path.join(bundle, FIFO_NAME)
    os.mkfifo(fifo, 0o600)
    argv = sup.conmon_argv(cid, cid[:12], bundle, await_fifo=fifo)
    try:
        launch = launch_conmon(argv, bundle, sup._conmon_env())
    except BaseException:
        _remove_pair_files(engine.run_dir, engine.root, cid)
        raise
    return Prestarted(cid, bundle, launch)


def _cancel_and_clean(entry: Prestarted, run_dir: str, root: str) -> None:
    entry.cancel()
    _remove_pair_files(run_dir, root, entry.cid, wait_for=entry.bundle)


def _remove_pair_files(run_dir: str, root: str, cid: str, wait_for: str | None = None) -> None:
    """A cancelled pair's bundle, exit file and log directory (after its conmon left)."""
    import shutil
    import time

    if wait_for is not None:  # conmon writes into the bundle until it exits
        pidfile = os.path.join(wait_for, "conmon.pid")
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            try:
                with open(pidfile) as f:
                    pid = int(f.read().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid <= 0 or _gone(pid):
                break
            time.sleep(0.01)
    shutil.rmtree(os.path.join(run_dir, "instances", cid), ignore_errors=True)
    try:
        os.unlink(os.path.join(run_dir, "exits", cid))
    except OSError:
        pass
    shutil.rmtree(os.path.join(root, "containers", cid), ignore_errors=True)
    remove_prejoined_cgroup(cid)


def _gone(pid: int) -> bool:
    """The process has exited: no such pid, or a zombie (reaped here if it is our child)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return True
    if state not in ("Z", "X"):
        return False
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    return True


def remove_prejoined_cgroup(cid: str) -> None:
    """The cgroup2 directory a pre-started runtime joined for `cid` (the runtime's default path; see
    cocon.runtime.cgroups.prejoin), when a runtime that never created its container did not remove it
    itself (killed). Best effort: it is only removed when empty."""
    import glob

    for d in glob.glob(f"/sys/fs/cgroup/unified/cocon/{cid}") + glob.glob(f"/sys/fs/cgroup/cocon/{cid}"):
        for _ in range(50):  # the killed runtime may still be leaving it
            try:
                os.rmdir(d)
                break
            except FileNotFoundError:
                break
            except OSError:
                import time

                time.sleep(0.01)


# --- the daemon's switch -----------------------------------------------------------------------------


def enable(root: str, run_dir: str, size: int = 1) -> Pool:
    """Keep `size` pairs ready for this engine (the daemon, at start)."""
    with _pools_lock:
        pool = _pools.get(run_dir)
        if pool is None:
            pool = _pools[run_dir] = Pool(root, run_dir, size)
    pool.fill_later()
    return pool


def pool_for(run_dir: str) -> Pool | None:
    return _pools.get(run_dir)


def disable(run_dir: str) -> None:
    with _pools_lock:
        pool = _pools.pop(run_dir, None)
    if pool is not None:
        pool.close()


def cancel_leftovers(engine: Engine) -> int:
    """Cancel the waiting pairs a killed daemon left (their containers never started); returns
    how many. A record that was created with such a pair starts cold later."""
    from cocon.engine.errors import NotFound

    base = os.path.join(engine.run_dir, "instances")
    try:
        names = os.listdir(base)
    except FileNotFoundError:
        return 0
    count = 0
    for cid in names:
        fifo = os.path.join(base, cid, FIFO_NAME)
        if not os.path.exists(fifo):
            continue
        try:
            rec = engine.instances.get(cid)
            running = rec.status == "running"
        except NotFound:
            rec, running = None, False
        if running:
            continue
        from cocon.engine.supervisor import ConmonLaunch

        _cancel_and_clean(
            Prestarted(cid, os.path.join(base, cid), ConmonLaunch(-1)), engine.run_dir, engine.root
        )
        if rec is not None:  # keep the record's log directory: it may hold logs of earlier runs
            os.makedirs(engine.supervisor.log_dir(cid), 0o700, exist_ok=True)
        count += 1
    return count
