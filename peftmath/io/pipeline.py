"""Read-ahead and write-behind threads for the streamed merge (:func:`peftmath.io.stream.transform`).

The streamed merge reads a group of tensors, computes it, and writes it, tensor after tensor. Reading
(``np.fromfile``), computing (NumPy, BLAS) and writing (``os.write``, ``os.copy_file_range``,
``os.fsync``) all release the GIL, so three threads overlap them:

- :class:`ReadAhead` reads the tensors the computation will ask for, in the order it will ask for
  them, a bounded number of bytes ahead of it;
- the caller's thread computes (the streamed merge of a bfloat16 model leaves the widening to float32 to
  the reader and the rounding back to the writer: :meth:`WriteBehind.write_at`'s ``prepare``);
- :class:`WriteBehind` executes the writes in the order they were submitted (open a file, write its
  header, write an array, copy a byte range of an input file, finish the file; or, for the files of
  :func:`peftmath.io.stream.prepare`, pre-sized with their headers, write an array or copy a range at
  its byte offset), a bounded number of bytes behind the caller; every 64 MiB written to a file it starts
  the write-back of what it wrote (``posix_fadvise``, without waiting), and each finished file is fsynced
  and closed by a third thread while the next one is written, so that little is left for the last fsync.

Bounds: each stage holds at most ``limit`` bytes of arrays (at least one array, whatever its size),
so peak memory is about two limits plus the group being computed. Errors: an exception in a thread
is re-raised in the caller's thread at its next call (``take``, ``write``, ``finish``) as it was
raised; :meth:`WriteBehind.abort` stops both threads and closes every file descriptor before the
caller removes its temporary output. With ``threaded=False`` both run inline in the caller's thread
(the sequential path: same operations, same order, same bytes; no write-back hints).
"""

from __future__ import annotations

import collections
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = ["ReadAhead", "WriteBehind", "write_all", "write_at", "copy_range"]


#: bytes written to a file between two starts of its write-back (:meth:`WriteBehind._written`)
WRITEBACK_BYTES = 64 << 20
_FADVISE = hasattr(os, "posix_fadvise") and hasattr(os, "POSIX_FADV_DONTNEED")


class _Stopped(Exception):
    """Raised inside a stage's thread when the stage is closed while it waits."""


class _Budget:
    """Bytes in flight, bounded: :meth:`acquire` waits while others hold bytes and ``n`` more would exceed
    ``limit`` (a single item larger than ``limit`` passes alone)."""

    def __init__(self, limit: int) -> None:
        self.limit = max(1, int(limit))
        self.used = 0
        self.closed = False
        self.cond = threading.Condition()

    def acquire(self, n: int) -> None:
        with self.cond:
            while self.used > 0 and self.used + n > self.limit and not self.closed:
                self.cond.wait()
            if self.closed:
                raise _Stopped
            self.used += n

    def release(self, n: int) -> None:
        with self.cond:
            self.used -= n
            self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()


class ReadAhead:
    """``read(key)`` for ``keys`` in order, ahead of the caller, at most ``limit`` bytes (``nbytes(key)``)
    held at a time; :meth:`take` returns them. A key outside ``keys``, or taken out of order, is read
    directly. An error of ``read`` is raised by the :meth:`take` of its key."""

    def __init__(self, read: Callable[[str], np.ndarray], keys: Sequence[str], nbytes: Callable[[str], int],
                 limit: int, *, threaded: bool = True) -> None:
        self._read = read
        self._keys = list(keys)
        self._nbytes = nbytes
        self._next = 0  # index in keys of the next key take() expects
        self._ready: dict[str, Any] = {}  # key -> array, or the exception its read raised
        self._budget = _Budget(limit)
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        if threaded and self._keys:
            self._thread = threading.Thread(target=self._run, name="peftmath-read-ahead", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        for key in self._keys:
            try:
                self._budget.acquire(self._nbytes(key))
            except _Stopped:
                return
            try:
                value: Any = self._read(key)
            except BaseException as exc:  # handed to the caller's take()
                value = exc
            with self._cond:
                self._ready[key] = value
                self._cond.notify_all()
            if isinstance(value, BaseException):
                return

    def take(self, key: str) -> np.ndarray:
        if self._thread is None or self._next >= len(self._keys) or self._keys[self._next] != key:
            return self._read(key)
        self._next += 1
        with self._cond:
            while key not in self._ready:
                self._cond.wait()
            value = self._ready.pop(key)
        self._budget.release(self._nbytes(key))
        if isinstance(value, BaseException):
            raise value
        return value

    def close(self) -> None:
        """Stop reading ahead (idempotent); what was read and not taken is dropped."""
        self._budget.close()
        if self._thread is not None:
            self._thread.join()
        self._ready.clear()


class WriteBehind:
    """Ordered writes to output files, executed by a thread behind the caller (inline when not ``threaded``).

    Appending: :meth:`open` starts a file with its first bytes (the header), :meth:`write` appends an
    array's bytes, :meth:`copy` appends a byte range of an open input file (``os.copy_file_range``: never
    through Python). Positional (the pre-sized files of :func:`peftmath.io.stream.prepare`): :meth:`attach`
    opens an existing file and returns its id, :meth:`write_at` / :meth:`copy_at` write at a byte offset of
    it (:func:`write_at`, :func:`copy_range`: the functions the engines' tasks call). :meth:`end_file` has a
    file fsynced and closed (by a third thread, while the next file is written); :meth:`finish` waits for
    all of it and raises the first error; :meth:`abort` stops everything and closes every descriptor.
    Arrays given to :meth:`write` / :meth:`write_at` must not change afterwards.
    """

    def __init__(self, limit: int, *, threaded: bool = True) -> None:
        self._budget = _Budget(limit)
        self._jobs: collections.deque = collections.deque()
        self._cond = threading.Condition()
        self._error: BaseException | None = None
        self._stop = False
        self._ids = 0  # file ids handed out (the caller's side)
        self._current: int | None = None  # the file :meth:`write` appends to (the caller's side)
        self._ends: dict[int, int] = {}  # file id -> bytes appended so far (the caller's side)
        self._open: dict[int, int] = {}  # file id -> descriptor (the writer's side)
        self._hints: dict[int, list[int]] = {}  # file id -> [lowest, highest offset, bytes] not yet hinted
        self._fds: set[int] = set()  # every descriptor opened and not closed yet
        self._fds_lock = threading.Lock()
        self._syncs: list[threading.Thread] = []
        self._sync_errors: list[BaseException] = []
        self._threaded = threaded
        self._thread: threading.Thread | None = None
        if threaded:
            self._thread = threading.Thread(target=self._run, name="peftmath-write-behind", daemon=True)
            self._thread.start()

    # --- the caller's side ---------------------------------------------------------------------
    def open(self, path: os.PathLike | str, head: bytes) -> int:
        """Create (truncate) ``path``, write ``head`` at its start; :meth:`write` appends to it from now on."""
        fid = self._new_id()
        self._submit(("open", fid, os.fspath(path), head), 0)
        self._current, self._ends[fid] = fid, len(head)
        return fid

    def attach(self, path: os.PathLike | str) -> int:
        """Open the existing file ``path`` for :meth:`write_at` / :meth:`copy_at`; returns its id."""
        fid = self._new_id()
        self._submit(("attach", fid, os.fspath(path)), 0)
        return fid

    def write(self, arr: np.ndarray) -> None:
        fid = self._current
        self.write_at(fid, self._ends[fid], arr)
        self._ends[fid] += arr.nbytes

    def copy(self, src_fd: int, offset: int, count: int) -> None:
        fid = self._current
        self.copy_at(fid, src_fd, offset, count, self._ends[fid])
        self._ends[fid] += count

    def write_at(self, fid: int, offset: int, arr: np.ndarray,
                 prepare: Callable[[np.ndarray], np.ndarray] | None = None,
                 done: Callable[[np.ndarray], None] | None = None, nbytes: int | None = None) -> None:
        """Write ``arr``'s bytes at ``offset`` of file ``fid``. In the writer's thread, ``prepare(arr)`` (when
        given) runs first and its result is written instead, and ``done(arr)`` runs once the bytes are written
        (:func:`peftmath.io.stream.transform` rounds a float32 result to bfloat16 there, beside the next
        computation, then gives its buffer back). ``nbytes``: what it counts against the limit (default
        ``arr.nbytes``)."""
        self._submit(("write", fid, offset, arr, prepare, done), arr.nbytes if nbytes is None else nbytes)

    def copy_at(self, fid: int, src_fd: int, src_offset: int, count: int, offset: int) -> None:
        self._submit(("copy", fid, src_fd, src_offset, count, offset), 0)

    def end_file(self, fid: int | None = None) -> None:
        if fid is None:
            fid, self._current = self._current, None
        self._submit(("end", fid), 0)

    def _new_id(self) -> int:
        self._ids += 1
        return self._ids

    def finish(self) -> None:
        """Wait until every write is done and every file fsynced and closed; raise the first error."""
        if self._thread is not None:
            with self._cond:
                self._jobs.append(None)
                self._cond.notify_all()
            self._thread.join()
            self._thread = None
        self._join_syncs()
        self._raise()

    def abort(self) -> None:
        """Stop the threads (idempotent), wait for them, close every descriptor; errors are dropped."""
        self._budget.close()
        with self._cond:
            self._stop = True
            self._jobs.clear()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._join_syncs()
        with self._fds_lock:
            for fd in self._fds:
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._fds.clear()

    def _raise(self) -> None:
        err = self._error or (self._sync_errors[0] if self._sync_errors else None)
        if err is not None:
            raise err

    def _submit(self, job: tuple, nbytes: int) -> None:
        self._raise()
        if not self._threaded:
            self._execute(job)
            return
        try:
            self._budget.acquire(nbytes)
        except _Stopped:
            self._raise()
            raise
        with self._cond:
            self._jobs.append((job, nbytes))
            self._cond.notify_all()

    # --- the writer's side ---------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
                item = self._jobs.popleft()
            if item is None:
                return
            job, nbytes = item
            try:
                self._execute(job)
            except BaseException as exc:
                self._error = exc
                self._budget.close()  # wakes a caller waiting for room; it raises the error
                return
            finally:
                item = job = None  # the array goes as soon as it is written
                self._budget.release(nbytes)

    def _execute(self, job: tuple) -> None:
        kind = job[0]
        if kind == "write":
            _, fid, offset, given, prepare, done = job
            arr = given if prepare is None else prepare(given)
            write_at(self._open[fid], offset, memoryview(arr.reshape(-1).view(np.uint8)))
            self._written(fid, offset, arr.nbytes)
            if done is not None:
                done(given)
        elif kind == "copy":
            _, fid, src_fd, src_offset, count, offset = job
            copy_range(src_fd, self._open[fid], src_offset, count, offset)
            self._written(fid, offset, count)
        elif kind in ("open", "attach"):
            flags = os.O_WRONLY | (os.O_CREAT | os.O_TRUNC if kind == "open" else 0)
            fd = os.open(job[2], flags, 0o666)  # & ~umask
            with self._fds_lock:
                self._fds.add(fd)
            self._open[job[1]] = fd
            if kind == "open":
                write_all(fd, memoryview(job[3]))
                self._written(job[1], 0, len(job[3]))
        elif kind == "end":
            fd = self._open.pop(job[1])
            self._hints.pop(job[1], None)
            if self._threaded:
                t = threading.Thread(target=self._sync, args=(fd,), name="peftmath-fsync", daemon=True)
                self._syncs.append(t)
                t.start()
            else:
                self._sync(fd, errors=False)

    def _written(self, fid: int, offset: int, n: int) -> None:
        """Start the write-back of every :data:`WRITEBACK_BYTES` written to a file, without waiting for it
        (``posix_fadvise(DONTNEED)`` starts it on dirty pages of the range written since the last start), so
        that the fsync at the end of the file has little left to do; a hint only (errors ignored, none on
        systems without it)."""
        h = self._hints.get(fid)
        if h is None:
            h = self._hints[fid] = [offset, offset + n, 0]
        h[0], h[1], h[2] = min(h[0], offset), max(h[1], offset + n), h[2] + n
        if h[2] >= WRITEBACK_BYTES and self._threaded and _FADVISE:
            try:
                os.posix_fadvise(self._open[fid], h[0], h[1] - h[0], os.POSIX_FADV_DONTNEED)
            except OSError:
                pass
            del self._hints[fid]

    def _sync(self, fd: int, errors: bool = True) -> None:
        try:
            os.fsync(fd)
        except BaseException as exc:
            if not errors:
                raise
            self._sync_errors.append(exc)
        finally:
            with self._fds_lock:
                if fd in self._fds:
                    self._fds.discard(fd)
                    os.close(fd)

    def _join_syncs(self) -> None:
        for t in self._syncs:
            t.join()
        self._syncs.clear()


def write_all(fd: int, data: memoryview) -> None:
    """Write all of ``data`` to ``fd`` (``os.write`` may write less than asked)."""
    view = data.cast("B") if data.format != "B" or data.ndim != 1 else data
    while view.nbytes:
        n = os.write(fd, view[: 1 << 30])
        view = view[n:]


def write_at(fd: int, offset: int, data: memoryview) -> None:
    """Write all of ``data`` to ``fd`` at byte ``offset`` (a seek, then :func:`write_all`: one writer per
    descriptor). Rewriting the same bytes at the same offset leaves the same file: a retried task is harmless."""
    os.lseek(fd, offset, os.SEEK_SET)
    write_all(fd, data)


def copy_range(src_fd: int, dst_fd: int, offset: int, count: int, dst_offset: int | None = None) -> None:
    """Copy ``count`` bytes of ``src_fd`` from ``offset`` to ``dst_fd`` at ``dst_offset`` (None: at its
    current position, which advances), in the kernel (``os.copy_file_range``) where it can, else through
    ``pread``/``write`` in 16 MiB chunks."""
    from ..errors import CheckpointError

    fast = hasattr(os, "copy_file_range")
    while count > 0:
        n = 0
        if fast:
            try:
                n = os.copy_file_range(src_fd, dst_fd, min(count, 1 << 30), offset, dst_offset)
            except OSError:
                fast = False
        if not fast:
            chunk = os.pread(src_fd, min(count, 1 << 24), offset)
            if not chunk:
                raise CheckpointError("input file shrank while it was being copied")
            if dst_offset is None:
                write_all(dst_fd, memoryview(chunk))
            else:
                write_at(dst_fd, dst_offset, memoryview(chunk))
            n = len(chunk)
        if n == 0:
            raise CheckpointError("input file shrank while it was being copied")
        offset += n
        count -= n
        if dst_offset is not None:
            dst_offset += n
