"""Running peftmath's whole-model work on an existing distributed engine (optional; nothing here is
imported by ``import peftmath`` or by the command unless ``--workers`` / ``--scheduler`` is given).

The streamed merge is a plan plus pure tasks (:func:`peftmath.io.stream.prepare`, :class:`~peftmath.io.stream.Job`,
:func:`~peftmath.io.stream.run_unit`): every output file's bytes are laid out before any task runs, each task
computes its tensors and writes them at their offsets, and the serial command runs exactly these tasks. An
engine only decides where and when they run, so every engine writes the same bytes.

- ``peftmath.engines.dask`` (``pip install 'peftmath[dask]'``): the merge, unmerge and extraction as
  ``dask.distributed`` tasks (a ``LocalCluster`` or an existing scheduler), ``peftmath.engines.dask.map_adapters``
  for many small jobs, and ``peftmath.engines.dask.blockwise_merge`` for one tensor larger than a worker's memory.
- ``peftmath.engines.rows``: which methods merge a weight block of output rows on its own (the capability
  the blockwise merge needs), and the per-block merge itself (array API only; no engine needed).
"""

__all__: list[str] = []  # the engines are submodules, imported on demand (import peftmath.engines.dask)
