"""peftmath on ``dask.distributed``: the streamed merge, unmerge and extraction as tasks on a cluster, many small
adapter jobs batched into few tasks, and the blockwise merge of one tensor larger than a worker's memory.

Install: ``pip install 'peftmath[dask]'`` (dask and distributed). Nothing here starts a cluster of its own
accord: :func:`client` opens a ``LocalCluster`` (threads by default) or connects to a running scheduler, and
every function takes that ``client``.

- :func:`transform` (``peftmath merge|unmerge ... --workers N`` / ``--scheduler ADDRESS``): the client plans and
  lays out the output (:func:`peftmath.io.stream.prepare`: temporary files pre-sized, headers written), the
  workers run one task per unit (:func:`peftmath.io.stream.run_unit`: one copy range, one cast or replaced
  tensor, or one adapted weight with its bias, DoRA's records included), each writing its bytes at their
  offsets, and the client commits (fsync, index, side files, records, one rename). The tasks are the ones the
  serial command runs, so the output is byte-identical to ``peftmath merge``'s. A task that fails fails the
  run: the other tasks are cancelled, the temporary output is removed, nothing is left at ``OUT``. A worker
  that dies has its tasks re-run elsewhere by the scheduler; a task re-run writes the same bytes at the same
  offsets. With ``--scheduler``, every worker must see the model, the adapters and the output's folder at the
  same paths (a shared file system).
- :func:`extract` (``peftmath extract ... --workers N``): one task per tensor of TUNED (the SVD of one
  module's ``TUNED - BASE``), gathered in order, so the adapter written is the serial command's.
- :func:`map_adapters`: ``fn`` over many adapters (or any items) in batches of ``batch`` per task (one small
  adapter per task costs the scheduler more than the work).
- :func:`blockwise_merge`: one tensor merged over blocks of output rows with the method's own in-place kernel
  per block (:mod:`peftmath.engines.rows` says which methods allow it, and refuses the others by name), lazily:
  peak memory is about one block per running thread, not the tensor.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from ..errors import ConfigError, UnsupportedError
from ..io import stream
from . import rows

__all__ = ["client", "transform", "extract", "map_adapters", "blockwise_merge", "row_blocks", "DEFAULT_RETRIES"]

#: how many times a failed task is re-run before the run fails (a worker that died: the scheduler re-runs its
#: tasks anyway, up to ``distributed.scheduler.allowed-failures``)
DEFAULT_RETRIES = 0


def _distributed() -> Any:
    try:
        import distributed
    except ImportError as exc:
        raise UnsupportedError(f"--workers / --scheduler need dask.distributed ({exc}); install it with "
                               f"pip install 'peftmath[dask]'") from None
    return distributed


@contextlib.contextmanager
def client(workers: int | None = None, scheduler: str | None = None, *, processes: bool = False,
           threads_per_worker: int = 1) -> Iterator[Any]:
    """A ``distributed.Client``: connected to the scheduler at ``scheduler`` (``tcp://host:8786``), or to a new
    ``LocalCluster`` of ``workers`` workers (threads in this process by default; ``processes=True``: one process
    each) with ``threads_per_worker`` threads, closed on exit. The dashboard, where bokeh is installed, listens
    on a free port of this machine."""
    d = _distributed()
    quiet = logging.getLogger("distributed")
    level = quiet.level
    quiet.setLevel(max(level, logging.ERROR))  # its INFO lines (and the comm tracebacks of a normal close) are noise
    try:
        with _client(d, workers, scheduler, processes, threads_per_worker) as c:
            yield c
    finally:
        quiet.setLevel(level)


@contextlib.contextmanager
def _client(d: Any, workers: int | None, scheduler: str | None, processes: bool, threads_per_worker: int) -> Iterator[Any]:
    if scheduler is not None:
        if workers is not None:
            raise ConfigError("give --workers N (a local cluster) or --scheduler ADDRESS (a running one), not both")
        try:
            c = d.Client(scheduler, timeout="10s")
        except OSError as exc:
            raise ConfigError(f"--scheduler {scheduler}: cannot connect ({exc}); start one with `dask scheduler` "
                              f"and `dask worker {scheduler}`, or use --workers N for a local cluster") from None
        try:
            yield c
        finally:
            c.close()
        return
    n = int(workers or 1)
    if n <= 0:
        raise ConfigError(f"--workers must be a positive number of workers, got {workers}")
    # ":0": the scheduler's HTTP server (and a dashboard, where bokeh is installed) on a free port; None would
    # take port 8787 and warn when another cluster has it
    cluster = d.LocalCluster(n_workers=n, threads_per_worker=threads_per_worker, processes=processes,
                             dashboard_address=":0")
    c = d.Client(cluster)
    try:
        yield c
    finally:
        c.close()
        cluster.close()


def _identity(x: Any) -> Any:
    return x


def _cancel(c: Any, futures: Sequence[Any]) -> None:
    try:
        c.cancel(list(futures))
    except Exception:  # noqa: BLE001 - the client may be closing; the tasks cannot create files anyway
        pass


def transform(base: stream.Model, adapters: Sequence[Any], out: Any, *, client: Any,
              progress: Callable[[int], None] | None = None, retries: int = DEFAULT_RETRIES,
              task: Callable[[stream.Job, int], dict] | None = None, **options: Any) -> stream.Report:
    """:func:`peftmath.io.stream.transform` with its units run as tasks on ``client`` (same options, same
    output bytes). ``retries``: re-runs of a failed task before the run fails. ``task(job, i)``: the function
    each task runs (default :func:`peftmath.io.stream.run_unit`; a wrapper, e.g. to time or log the units,
    must return what ``run_unit`` returns). ``to_xp``/``to_host`` (another backend) are refused: the tasks
    compute with NumPy."""
    if options.get("to_xp") is not None or options.get("to_host") is not None:
        raise UnsupportedError("--backend with --workers/--scheduler: the engine's tasks compute with NumPy; drop "
                               "--backend, or merge without an engine")
    options.pop("pipeline", None)
    outp = stream.prepare(base, adapters, out, **options)
    futures: list[Any] = []
    try:
        job = outp.job
        # the job travels as a task's argument, not scattered data: the scheduler keeps the task, so a worker
        # that dies holding the job's only copy has it rebuilt (scattered data would be lost with it). The graph
        # then holds the adapters once, on purpose: distributed's "large graph" advice does not apply
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sending large graph", category=UserWarning)
            jf = client.submit(_identity, job, pure=False)
        n = len(job.units)
        futures = client.map(task or stream.run_unit, [jf] * n, list(range(n)), pure=False, retries=retries)
        index = {f.key: i for i, f in enumerate(futures)}
        records: dict[str, Any] = {}
        d = _distributed()
        for fut in d.as_completed(futures):
            records.update(fut.result())  # raises the task's error (or the cancellation), never yields it
            if progress is not None:
                progress(job.units[index[fut.key]].nbytes)
    except BaseException:
        _cancel(client, futures)  # a task still running writes into a removed file, or fails to open it
        outp.abort()
        raise
    return outp.commit(records)


def _ordered(c: Any, retries: int) -> Callable[[Callable[[Any], Any], Iterable[Any]], Iterator[Any]]:
    """A ``map(fn, items)`` that runs each item as a task on ``c`` and yields the results in order (the rest
    cancelled at the first error)."""

    def run(fn: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]:
        futures = c.map(fn, list(items), pure=False, retries=retries)
        try:
            for f in futures:
                yield f.result()
        finally:
            _cancel(c, [f for f in futures if not f.done()])

    return run


def extract(base: str, tuned: str, out: str, *, client: Any, retries: int = DEFAULT_RETRIES,
            **options: Any) -> dict[str, dict[str, Any]]:
    """:func:`peftmath.extract.extract_lora` with one task per tensor of TUNED on ``client`` (same options,
    same adapter written)."""
    from ..extract import extract_lora

    return extract_lora(base, tuned, out, map_tasks=_ordered(client, retries), **options)


def _run_batch(fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
    return [fn(x) for x in items]


def map_adapters(fn: Callable[[Any], Any], adapters: Sequence[Any], *, client: Any, batch: int = 25,
                 retries: int = DEFAULT_RETRIES, **kwargs: Any) -> list[Any]:
    """``[fn(a, **kwargs) for a in adapters]`` on ``client``, ``batch`` items per task (default 25: one small
    adapter per task costs the scheduler more than the work), results in order. ``fn`` and the items must be
    picklable for a cluster of processes (a module-level function; adapters pass by value)."""
    if batch <= 0:
        raise ConfigError(f"batch must be a positive number of items per task, got {batch}")
    f = functools.partial(fn, **kwargs) if kwargs else fn
    items = list(adapters)
    chunks = [items[i:i + batch] for i in range(0, len(items), batch)]
    futures = client.map(_run_batch, [f] * len(chunks), chunks, pure=False, retries=retries)
    try:
        return list(itertools.chain.from_iterable(client.gather(futures)))
    finally:
        _cancel(client, [x for x in futures if not x.done()])


class _Portable:
    """A bound module that pickles by value whatever its class's ``__new__`` takes (tasks of a process cluster)."""

    def __init__(self, mod: Any) -> None:
        self.mod = mod

    def __reduce__(self) -> tuple:
        return _rebuild, (type(self.mod), dict(self.mod.__dict__))


def _rebuild(cls: type, state: dict[str, Any]) -> _Portable:
    mod = object.__new__(cls)
    mod.__dict__.update(state)
    return _Portable(mod)


def _merge_block(block: Any, portable: _Portable, peft_compat: bool, unmerge: bool, block_info: Any = None) -> Any:
    r0 = block_info[0]["array-location"][0][0]
    return rows.merge_rows(portable.mod, block, r0, peft_compat=peft_compat, unmerge=unmerge)


def row_blocks(array: Any, block_rows: int) -> Any:
    """``array`` (a NumPy array, a ``numpy.memmap``, any sliceable array) as a dask array of ``block_rows``-row
    blocks read when their tasks run: nothing is copied when the graph is built (``dask.array.from_array`` copies
    an array that has ``.copy()``, all of a memory map), and nothing is hashed (``name=False``)."""
    import dask.array as da
    import numpy as np

    return da.from_array(_Blocks(array), chunks=(block_rows,) + (-1,) * (array.ndim - 1), name=False,
                         asarray=False if isinstance(array, np.ndarray) else None)


class _Blocks:
    """``array`` seen by ``dask.array.from_array`` as shape, dtype and slicing only (no ``copy``: dask would copy
    the whole array when the graph is built)."""

    def __init__(self, array: Any) -> None:
        self.array, self.shape, self.dtype, self.ndim = array, tuple(array.shape), array.dtype, array.ndim

    def __getitem__(self, index: Any) -> Any:
        return self.array[index]


def blockwise_merge(weight: Any, mod: Any, *, block_rows: int | None = None, peft_compat: bool = False,
                    unmerge: bool = False) -> Any:
    """The merged (``unmerge``: unmerged) ``weight`` of bound module ``mod`` as a lazy ``dask.array``, one task
    per block of output rows, each running the method's in-place kernel on a private copy of its block
    (:func:`peftmath.engines.rows.merge_rows`).

    ``weight``: a dask array (rows chunked as given, or by ``block_rows``; the columns are put in one chunk) or
    an array / ``numpy.memmap`` (chunked by ``block_rows``, default about 64 MiB per block; each block is read
    when its task runs, so the array must not change until the result is computed). Store or compute
    the result with any dask scheduler (``da.store`` into a memory map or a zarr array keeps about one block per
    running thread in memory). Methods whose rows are not independent raise :class:`UnsupportedError` naming
    the reason (:data:`peftmath.engines.rows.NOT_ROW_LOCAL`). DoRA's merge records (its row norms) are not
    returned: unmerge DoRA with the whole-tensor path and its records."""
    import dask.array as da
    import numpy as np

    rows.row_rule(mod)  # refuse before building anything (LoKr: block_rows rounded down to whole w1 rows)
    if tuple(weight.shape) != tuple(mod.layer.weight_shape):
        from ..errors import ShapeError

        raise ShapeError(f"{mod.name}: weight of shape {tuple(weight.shape)} for a module bound to "
                         f"{tuple(mod.layer.weight_shape)}")
    if block_rows is not None and block_rows <= 0:
        raise ConfigError(f"block_rows must be a positive number of rows, got {block_rows}")
    if block_rows is None and not isinstance(weight, da.Array):
        row_bytes = int(np.prod(weight.shape[1:])) * np.dtype(weight.dtype).itemsize
        block_rows = max(1, (64 << 20) // max(1, row_bytes))
    unit = rows.row_alignment(mod)  # LoKr: blocks of whole w1 rows
    if unit > 1:
        if block_rows is None:  # a dask array's own row chunks: the first one, rounded
            block_rows = int(weight.chunks[0][0])
        block_rows = max(unit, block_rows - block_rows % unit)
    if isinstance(weight, da.Array):
        w = (weight.rechunk((block_rows,) + (-1,) * (weight.ndim - 1)) if block_rows is not None
             else weight.rechunk({i: -1 for i in range(1, weight.ndim)}))
    else:
        w = row_blocks(weight, block_rows)
    return w.map_blocks(_merge_block, _Portable(mod), peft_compat, unmerge, dtype=w.dtype,
                        meta=np.empty((0,) * w.ndim, dtype=w.dtype))
