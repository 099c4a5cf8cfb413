"""Read, decode and preprocess in worker processes (or threads), off the daemon's own threads.

Processes, by default: pydicom's parsing is Python that holds the GIL, which threads would share
(`make bench` times both on the host at hand), and a native decoder (JPEG, JPEG 2000, RLE) that
crashes on a hostile file takes down one worker, not the daemon. After a worker dies, each
input that was in the pool is tried again alone in a fresh process: one that kills two lone workers is
rejected as decoder_crashed, the others are scored as usual.

Each worker process may use limits.worker_memory_mb of data memory (a file that needs more is rejected as
decode_out_of_memory) and limits.decode_timeout_s per file (decode_timeout); threads have neither, nor the
watch below. A worker that ran out of memory, or holds more than half its cap after a file (a decoder that
failed without freeing what it took), is recycled: the pool's workers are replaced by fresh ones once their
files are done, and the old ones' memory goes back to the system. A call that never returns (a worker wedged
where no signal reaches it) is ended from here after STUCK_FACTOR times the time limit; a worker killed while
it was writing its answer (the OOM killer, an admin's kill -9) leaves the executor reading the rest of that
answer for good, blind to the death, so a pool with a dead worker and calls still unanswered after
DEATH_GRACE_S is ended from here too. Closing ends what is still running after CLOSE_WAIT_S, as it ends a
worker that does not leave when its pool shuts down: no input can stay in flight for good, and stopping never
waits on one. A queued file is opened without blocking and refused if it is no longer a regular file (a FIFO in
its place would hold a worker, or a thread, for good).

A file from the watched folder is prepared only if it is still the file that was hashed and journaled: the
same inode, size and time, or else the same content (times set after closing, as `cp -p` does); otherwise it
is rejected as file_changed and left in the folder for its new content to be taken.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import multiprocessing
import os
import queue
import resource
import signal
import stat
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Literal

from appliance.domain.errors import (
    CorruptImage,
    DecodeOutOfMemory,
    DecoderCrashed,
    DecodeTimeout,
    FileRewritten,
    FileVanished,
    InputRejected,
)
from appliance.domain.manifest import Manifest
from appliance.files.content_hash import digest_bytes
from appliance.logging_setup import quiet_pydicom
from appliance.malloc_tuning import keep_freed_memory
from appliance.prepare.limits import LimitsConfig
from appliance.prepare.preparer import Prepared, Preparer
from appliance.prepare.worker_stderr import WorkerStderr, redirect_stderr
from appliance.scheduling import lower_this_thread

log = logging.getLogger(__name__)

Mode = Literal["processes", "threads"]
DAEMON_CHECK_S = 1.0
Screened = tuple[int, int, int]  # inode, size, mtime_ns of the file as the folder's intake screened it
# A call to retry alone: the worker function, its arguments, and what to answer if it kills (or wedges) two
# workers, given the rejection to answer with.
Call = tuple[Callable[..., Any], tuple[Any, ...], Callable[[InputRejected], Any]]

_preparer: Preparer | None = None  # one per worker process (or one shared by the threads)
_timeout_s = 0.0  # a worker process's limit per file; 0: none
_armed = False  # SIGALRM ends a file only while one is being prepared
# A decoder stuck in native code never returns to Python, where SIGALRM's handler runs: past this many
# times the limit in CPU seconds the kernel ends the worker (SIGXCPU), and the pool's retries take over.
CPU_BACKSTOP = 4
# A call still running this many times the per-file limit (past the CPU backstop) is wedged: its workers are ended.
STUCK_FACTOR = CPU_BACKSTOP + 1
STUCK_MARGIN_S = 10.0
# The executor notices a dead worker at once unless it is reading that worker's cut-off answer: a pool with a
# dead worker and calls still unanswered this long after is stuck so.
DEATH_GRACE_S = 2.0
CLOSE_WAIT_S = 5.0  # closing: how long the files being decoded may take to finish before their workers are ended
RECYCLE_FRACTION = 0.5  # a worker holding more than this share of its memory cap after a file is replaced,
RECYCLE_GROWTH = 256 << 20  # and this much more than it held once started (a small cap is not crossed by imports)
_recycle_above = 0  # bytes resident; 0: never
NOT_A_FILE = "The file was replaced by something that is not a regular file (a FIFO, a device or a folder)."


@dataclass(frozen=True)
class Answer:
    """What a worker process sends back for a call: its value or its error, and whether it should be replaced."""

    value: Any
    error: BaseException | None
    recycle: bool


def worker_initargs(
    manifest: Manifest, limits: LimitsConfig, processes: bool, display_side: int = 0
) -> tuple[Any, ...]:
    """The arguments of `init_worker` for decode workers of this process (processes watch it to leave
    with it; threads share its Preparer). ``display_side``: see `Preparer`."""
    return (manifest, limits, (os.getpid(), _identity(os.getpid())) if processes else None, display_side)


def init_worker(
    manifest: Manifest,
    limits: LimitsConfig,
    daemon: tuple[int, str] | None,
    display_side: int = 0,
    stderr: Connection | None = None,
) -> None:
    """A decode worker's set-up (or the threads' shared one, ``daemon`` None). ``stderr``: the daemon's end of
    its WorkerStderr pipe, which becomes this process's fd 2."""
    global _preparer, _timeout_s
    if stderr is not None:  # first: what the set-up below may print goes through the log too, never raw
        redirect_stderr(stderr)
    quiet_pydicom()  # a fresh process: pydicom's warnings would print invalid values (names) raw
    _preparer = Preparer(manifest, limits, display_side=display_side)
    if daemon is not None:  # a worker process
        # Ctrl-C in a terminal reaches the whole process group; the daemon stops its workers itself.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        keep_freed_memory()
        lower_this_thread()  # a feeder: inference first (appliance/scheduling.py)
        _limit_self(limits)
        _exit_with(*daemon)


def answer(fn: Callable[..., Any], *args: Any) -> Answer:
    """`fn(*args)` in a worker process, with whether the worker should now be replaced: it ran out of memory,
    or still holds more than RECYCLE_FRACTION of its cap (what glibc keeps for reuse is far below that)."""
    try:
        value, error = fn(*args), None
    except BaseException as e:
        value, error = None, e
    out_of_memory = isinstance(error, MemoryError | DecodeOutOfMemory)
    if error is not None:
        error.__traceback__ = None  # sent back by pickling, which drops it anyway; the frames held the arrays
    return Answer(value, error, out_of_memory or (_recycle_above > 0 and _resident() > _recycle_above))


def _resident() -> int:
    """This process's resident memory in bytes (0 where /proc cannot say)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()
    except (OSError, IndexError, ValueError):
        return 0


def _limit_self(limits: LimitsConfig) -> None:
    """Memory cap and time limit of a worker process. RLIMIT_DATA, not RLIMIT_AS: the address space also
    counts what threads and libraries reserve without using (glibc's 64 MiB per-thread arenas, OpenCV's
    pool), which says little of the memory a decode takes."""
    global _timeout_s, _recycle_above
    # A core dump of a decode worker would hold a patient's image and header: never written.
    resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
    if limits.worker_memory_mb > 0:
        _, hard = resource.getrlimit(resource.RLIMIT_DATA)
        cap = limits.worker_memory_mb << 20
        resource.setrlimit(resource.RLIMIT_DATA, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard))
        _recycle_above = max(int(cap * RECYCLE_FRACTION), _resident() + RECYCLE_GROWTH)
    if limits.decode_timeout_s > 0:
        _timeout_s = limits.decode_timeout_s
        signal.signal(signal.SIGALRM, _overtime)


class _Overtime(BaseException):
    """SIGALRM's exception: a BaseException, so that no library's `except Exception` swallows it."""


def _overtime(signum: int, frame: object) -> None:
    if _armed:
        raise _Overtime()


def _timed(fn: Callable[..., Prepared], *args: Any) -> Prepared:
    """`fn(*args)` under the worker's time limit (none in threads: signals reach the main thread only)."""
    global _armed
    if not _timeout_s or threading.current_thread() is not threading.main_thread():
        return fn(*args)
    cpu_limit = resource.getrlimit(resource.RLIMIT_CPU)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    backstop = int(usage.ru_utime + usage.ru_stime + CPU_BACKSTOP * _timeout_s) + 1
    if cpu_limit[1] == resource.RLIM_INFINITY or backstop <= cpu_limit[1]:
        resource.setrlimit(resource.RLIMIT_CPU, (backstop, cpu_limit[1]))
    _armed = True
    signal.setitimer(signal.ITIMER_REAL, _timeout_s)
    try:
        return fn(*args)
    finally:
        _armed = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        resource.setrlimit(resource.RLIMIT_CPU, cpu_limit)


def _identity(pid: int) -> str:
    """A process's pid and start time: a later process given the same pid does not match."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return f"{pid}:{stat[stat.rindex(')') + 2 :].split()[19]}"
    except OSError:
        return f"{pid}:gone"


def _exit_with(pid: int, identity: str) -> None:
    """Once the daemon is gone (killed -9, say), a worker would wait on its task queue for good, and
    its forkserver with it (each worker holds the forkserver's keep-alive pipe): leave."""

    def watch() -> None:
        while _identity(pid) == identity:
            time.sleep(DAEMON_CHECK_S)
        os._exit(0)

    threading.Thread(target=watch, name="daemon-watch", daemon=True).start()


def _prepare(data: bytes, file_name: str) -> Prepared:
    assert _preparer is not None, "the worker was not initialized"
    try:
        prepared = _timed(_preparer.prepare, data, file_name)
    except _Overtime:
        # Raised between two bytecodes: the worker's state is whole, and it goes on with the next file.
        raise DecodeTimeout(
            f"Decoding and preprocessing the file took longer than {_timeout_s:g} s (limits.decode_timeout_s)."
        ) from None
    if not prepared.tensors:
        raise CorruptImage("The image holds no frames.")
    return prepared


def prepare_file(path: str, file_name: str, screened: Screened | None = None, content_hash: str = "") -> Prepared:
    """Read and prepare a journaled input; raises an InputRejected subclass for a bad one. With ``screened``
    (the folder's file as it was hashed), FileRewritten unless it is still that file or holds that content."""
    assert _preparer is not None, "the worker was not initialized"
    try:
        # O_NONBLOCK: a FIFO (or a device) put in place of the queued file must not block a worker for good;
        # with threads nothing would ever end that read, and the daemon's stop would wait on it.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError as e:
        raise FileVanished() from e
    with open(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise FileVanished(NOT_A_FILE)
        if screened is not None and st.st_size != screened[1]:  # another size cannot hold the bytes journaled
            raise FileRewritten()
        _preparer.check_size(st.st_size)  # before reading it into memory
        try:
            data = f.read()
        except MemoryError:  # the file alone is more than the worker may hold (limits.worker_memory_mb)
            raise DecodeOutOfMemory() from None
    moved = screened is not None and (st.st_ino, st.st_size, st.st_mtime_ns) != screened
    if moved and digest_bytes(data) != content_hash:  # not what was journaled: never scored under its hash
        raise FileRewritten()
    return _prepare(data, file_name)


def _ready(hold_s: float) -> int:
    time.sleep(hold_s)  # busy, so that the pool starts another worker for the next call
    return os.getpid()


def _rejected(error: InputRejected) -> Any:
    raise error


# Each process pool's workers, by pid. ProcessPoolExecutor gives no public way to reach them before Python 3.14
# (kill_workers), and drops its own reference at shutdown, while its manager thread still waits on them.
_processes_of: weakref.WeakKeyDictionary[Executor, dict[int, Any]] = weakref.WeakKeyDictionary()


def _end_workers(pool: Executor) -> None:
    """Kill a process pool's workers and close this process's end of the pipe they answer on: the pool breaks,
    and what they held is retried alone (or cancelled when closing). With no writer left, an executor reading
    the rest of an answer a killed worker had begun gets end-of-file instead of waiting for good."""
    for process in list(_processes_of.get(pool, {}).values()):
        with contextlib.suppress(OSError, ValueError, AttributeError):  # already gone
            process.kill()
    # Private, as `_processes`: nothing public reaches the pipe (3.11-3.14); this process never writes on it.
    writer = getattr(getattr(pool, "_result_queue", None), "_writer", None)
    if writer is not None:
        with contextlib.suppress(OSError):
            writer.close()


def _sentinels(pool: Executor) -> dict[Any, Any]:
    """A process pool's workers by their sentinels, which become readable when a worker exits."""
    sentinels: dict[Any, Any] = {}
    for process in list(_processes_of.get(pool, {}).values()):
        with contextlib.suppress(ValueError, AttributeError):  # closed or never started
            sentinels[process.sentinel] = process
    return sentinels


def _has_dead_worker(pool: Executor) -> bool:
    """Whether a process pool's worker has exited: its sentinel is readable (nothing is read from it here,
    which is the executor's to do)."""
    sentinels = list(_sentinels(pool))
    try:
        return bool(sentinels) and bool(multiprocessing.connection.wait(sentinels, 0))
    except (OSError, ValueError):  # closed meanwhile: the executor has seen it
        return False


def _leave_or_end(pool: Executor, wait_s: float) -> None:
    """Shut a pool down: its idle workers get ``wait_s`` to leave, and one that does not (stopped, or wedged
    between files) is ended, since the executor's own shutdown would wait on it for good."""
    pool.shutdown(wait=False)
    waiting = _sentinels(pool)
    deadline = time.monotonic() + wait_s
    while waiting and (left_s := deadline - time.monotonic()) > 0:
        for ready in multiprocessing.connection.wait(list(waiting), left_s):
            waiting.pop(ready)
    for process in waiting.values():
        with contextlib.suppress(OSError, ValueError, AttributeError):  # gone meanwhile
            process.kill()
    pool.shutdown(wait=True)


class PreparePool:
    def __init__(
        self, manifest: Manifest, limits: LimitsConfig, workers: int, mode: Mode = "processes", display_side: int = 0
    ) -> None:
        """``display_side`` > 0: each DICOM input's Prepared also holds its display frames, for overlays."""
        self._init_args = worker_initargs(manifest, limits, mode == "processes", display_side)
        self._stderr: WorkerStderr | None = None
        if mode == "processes":
            self._stderr = WorkerStderr(multiprocessing.get_context("forkserver"))
            self._init_args += (self._stderr.writer,)
        self._workers = workers
        self.mode = mode
        # A call running longer than this is wedged (0: no time limit, so none is judged wedged).
        self._stuck_s = STUCK_FACTOR * limits.decode_timeout_s + STUCK_MARGIN_S if limits.decode_timeout_s else 0.0
        self._lock = threading.Lock()
        self._settled = threading.Condition(self._lock)  # a call in `_running` was answered
        self._closing = False
        self._closed = threading.Event()
        self._generation = 0
        self._pool = self._new_pool(workers)
        # Calls in a worker process: the pool they were given to, and when they were first seen running.
        self._running: dict[Future[Any], tuple[Executor, float | None]] = {}
        self._lone: Executor | None = None
        self._lone_call: Future[Any] | None = None  # the call `_lone` was last given
        self._suspects: queue.Queue[tuple[Future[Any], Call] | None] = queue.Queue()
        self._retrier = threading.Thread(target=self._retry_alone, name="prepare-retry", daemon=True)
        self._retrier.start()
        if self.mode == "processes":
            threading.Thread(target=self._watch, name="prepare-watch", daemon=True).start()

    def _new_pool(self, workers: int) -> Executor:
        if self.mode == "threads":
            init_worker(*self._init_args)
            return ThreadPoolExecutor(workers, thread_name_prefix="prepare", initializer=lower_this_thread)
        # forkserver: workers fork from a clean process that has the imaging modules loaded, never from
        # the daemon itself, whose gRPC and SQLite threads a fork would copy mid-flight.
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([__name__])
        pool = ProcessPoolExecutor(workers, mp_context=context, initializer=init_worker, initargs=self._init_args)
        _processes_of[pool] = getattr(pool, "_processes", {})  # filled as workers start: the same dict
        return pool

    def warm(self) -> None:
        """Start every worker now (imports, forks) rather than on the first files of a burst."""
        calls = [self._pool.submit(_ready, 0.2) for _ in range(self._workers)]
        for call in calls:
            call.result(timeout=120)

    def prepare(
        self, path: Path, file_name: str, screened: Screened | None = None, content_hash: str = ""
    ) -> Future[Prepared]:
        """``screened``, ``content_hash``: see `prepare_file`."""
        return self._submit(prepare_file, (str(path), file_name, screened, content_hash), _rejected)

    def _submit(
        self, fn: Callable[..., Any], args: tuple[Any, ...], rejected: Callable[[InputRejected], Any]
    ) -> Future[Any]:
        """The outer future always completes: with the result, the input's own error, or cancelled when
        the pool is closing (the input then stays queued in the journal for the next start)."""
        outer: Future[Any] = Future()
        for _ in range(2):
            with self._lock:
                if self._closing:
                    outer.cancel()
                    return outer
                generation, pool = self._generation, self._pool
            try:
                inner = pool.submit(*self._call(fn, args))
            except BrokenProcessPool:  # a worker died between files, with nothing pending to notice it
                self._renew(generation)
                continue
            except RuntimeError:  # recycled meanwhile: this pool was shut down; the next one takes it
                continue
            if self.mode == "processes":
                with self._lock:
                    self._running[inner] = (pool, None)
            call: Call = (fn, args, rejected)
            inner.add_done_callback(functools.partial(self._settle, outer=outer, generation=generation, call=call))
            return outer
        raise BrokenProcessPool("the decode pool broke again as soon as it was renewed")

    def _call(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> tuple[Any, ...]:
        """What to submit: worker processes answer with an Answer (the value and whether to recycle)."""
        return (answer, fn, *args) if self.mode == "processes" else (fn, *args)

    def _settle(self, inner: Future[Any], outer: Future[Any], generation: int, call: Call) -> None:
        try:
            self._answer(inner, outer, generation, call)
        finally:
            with self._lock:
                self._running.pop(inner, None)
                self._settled.notify_all()

    def _answer(self, inner: Future[Any], outer: Future[Any], generation: int, call: Call) -> None:
        if inner.cancelled():  # shut down before it ran
            outer.cancel()
            return
        try:
            result = inner.result()
        except BrokenProcessPool:
            if self._closing:
                outer.cancel()
                return
            self._renew(generation)
            self._suspects.put((outer, call))
            return
        except BaseException as e:
            outer.set_exception(e)
            return
        if not isinstance(result, Answer):  # threads
            outer.set_result(result)
            return
        if result.recycle:
            self._recycle(generation)
        if result.error is not None:
            outer.set_exception(result.error)
        else:
            outer.set_result(result.value)

    def _renew(self, generation: int) -> None:
        """Replace a broken pool once, whichever of its inputs notices first."""
        with self._lock:
            if generation != self._generation or self._closing:
                return
            log.error("a decode worker process died; each input it held is tried again alone")
            broken, self._pool = self._pool, self._new_pool(self._workers)
            self._generation += 1
        broken.shutdown(wait=False, cancel_futures=True)

    def _recycle(self, generation: int) -> None:
        """Replace the pool's workers by fresh ones, its files still in hand finishing in the old ones: a worker
        past its memory cap keeps what it took (a decoder's heap, glibc's arenas) and would fail the next."""
        with self._lock:
            if generation != self._generation or self._closing:
                return
            log.warning("a decode worker ran out of memory or kept too much of it; the workers are replaced")
            old, self._pool = self._pool, self._new_pool(self._workers)
            self._generation += 1
        old.shutdown(wait=False)

    def _retry_alone(self) -> None:
        """Each input of a broken pool, alone in a fresh worker. A lone worker can also die of something
        else (found dead from before, the OOM killer): an input is rejected only after killing two, or
        after wedging two (past the time a call may take). Closing cancels what is left: no lone pool is
        made or given a call once `close` has begun, so none outlives the daemon's stop."""
        while (item := self._suspects.get()) is not None:
            outer, (fn, args, rejected) = item
            error: InputRejected = DecoderCrashed()
            for _ in range(2):
                try:
                    with self._lock:  # made and given its call under the lock: `close` ends whatever it sees
                        if self._closing:
                            outer.cancel()
                            break
                        if self._lone is None:
                            self._lone = self._new_pool(1)
                        lone = self._lone
                        call = self._lone_call = lone.submit(*self._call(fn, args))
                    result = call.result(timeout=self._stuck_s or None)
                except (BrokenProcessPool, TimeoutError) as e:
                    if isinstance(e, TimeoutError):
                        error = DecodeTimeout(
                            f"Decoding the file did not end within {self._stuck_s:g} s, twice; its workers were ended."
                        )
                    with self._lock:
                        _end_workers(lone)
                        lone.shutdown(wait=False, cancel_futures=True)
                        self._lone = None
                        if self._closing:  # its worker was ended by `close`: the input stays queued
                            outer.cancel()
                            break
                    continue
                except BaseException as e:
                    outer.set_exception(e)
                    break
                if isinstance(result, Answer) and result.recycle:
                    with self._lock:
                        lone.shutdown(wait=False)
                        self._lone = None
                if not isinstance(result, Answer):
                    outer.set_result(result)
                elif result.error is not None:
                    outer.set_exception(result.error)
                else:
                    outer.set_result(result.value)
                break
            else:
                log.error("a file crashed or wedged its decode worker again, alone; it is rejected")
                try:
                    outer.set_result(rejected(error))
                except BaseException as e:
                    outer.set_exception(e)
        with self._lock:
            last, self._lone = self._lone, None
        if last is not None:
            _leave_or_end(last, CLOSE_WAIT_S)

    def _watch(self) -> None:
        """End the workers of a pool that can no longer answer: one whose call has run past the time any file may
        take (a worker wedged in native code, or waiting on a lock no signal breaks, answers neither SIGALRM nor
        its CPU limit), or one with a dead worker and calls still unanswered DEATH_GRACE_S later (killed while
        writing its answer: the executor waits on the rest, and the next worker on the lock the dead one held)."""
        dead_since: dict[Executor, float] = {}
        ended: weakref.WeakSet[Executor] = weakref.WeakSet()  # each pool is ended once
        while not self._closed.wait(DAEMON_CHECK_S):
            now = time.monotonic()
            wedged: list[Executor] = []
            with self._lock:
                waiting = {pool for pool, _ in self._running.values()}
                if self._lone is not None and self._lone_call is not None and not self._lone_call.done():
                    waiting.add(self._lone)
                for inner, (pool, since) in list(self._running.items()) if self._stuck_s else ():
                    if since is None:
                        if inner.running():  # handed to a worker (or next in line for one)
                            self._running[inner] = (pool, now)
                    elif now - since > self._stuck_s and pool not in wedged:
                        wedged.append(pool)
            dead_since = {pool: dead_since.get(pool, now) for pool in waiting - set(ended) if _has_dead_worker(pool)}
            for pool in wedged:
                if pool not in ended:
                    log.error("a decode worker has not answered in %.0f s; its pool's workers are ended", self._stuck_s)
                    _end_workers(pool)
                    ended.add(pool)
            for pool, since in dead_since.items():
                if now - since >= DEATH_GRACE_S and pool not in ended:
                    log.error(
                        "a decode worker process died while answering (its pool has not noticed in %.0f s); "
                        "the pool's workers are ended",
                        now - since,
                    )
                    _end_workers(pool)
                    ended.add(pool)

    def alive(self) -> bool:
        return self._retrier.is_alive()

    def close(self, wait_s: float = CLOSE_WAIT_S) -> None:
        """Inputs not yet started are cancelled; those running get ``wait_s`` to finish, then their workers
        are ended and the inputs stay queued in the journal for the next start."""
        with self._lock:
            self._closing = True
            pool = self._pool
        pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            self._settled.wait_for(lambda: not self._running, wait_s)
            left = {pool for pool, _ in self._running.values()}
            lone = self._lone  # none is made once closing: `_retry_alone` checks under this lock
        for stuck in left:
            _end_workers(stuck)
        if lone is not None:
            _end_workers(lone)
        with self._lock:  # their calls answered: broken pool, cancelled inputs
            self._settled.wait_for(lambda: not self._running, wait_s)
        _leave_or_end(pool, wait_s)
        self._closed.set()
        self._suspects.put(None)
        self._retrier.join(timeout=30)
        if self._stderr is not None:
            self._stderr.close()
