r"""Multitask prompt tuning (Wang et al., 2023, "MPT"): one shared soft prompt, modulated per task.

Parameters (``T`` = num_virtual_tokens, ``S`` = num_transformer_submodules, ``D`` = token_dim, ``N`` =
num_tasks, ``r`` = num_ranks), saved under PEFT's keys:

* ``prompt_embeddings`` ``(T·S, D)``: the shared prompt ``P``;
* ``prefix_task_cols`` ``(N, T·S, r)``: ``U_t`` per task;
* ``prefix_task_rows`` ``(N, r, D)``: ``V_t`` per task.

Task prompt: ``P_t = P ⊙ (U_t V_t)`` (element-wise product with a rank-``r`` matrix), prepended to the
input embeddings exactly as prompt tuning's table (:func:`peftmath.methods.prompt_tuning.prepend`); every
batch row ``b`` gets the prompt of its own task id ``t_b``. Nothing is merged: no weight changes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from .._array import namespace
from ..backends import backend_for, host_rng
from ..config import check_choice
from ..errors import ConfigError, ShapeError
from ._contract import Method
from ._prompt import check_prompt_embeddings
from .prompt_tuning import PromptTuningConfig
from .prompt_tuning import init_prompt as init_shared_prompt

Array = Any

__all__ = ["MultitaskPromptTuningConfig", "init_from_source", "init_tables", "task_prompts", "trainable_parameters"]

PEFT_TYPE = "MULTITASK_PROMPT_TUNING"
SHARED_KEYS = ("prompt_embeddings", "prefix_task_cols", "prefix_task_rows")
SOURCE_INITS = ("AVERAGE_SOURCE_TASKS", "EXACT_SOURCE_TASK", "ONLY_SOURCE_SHARED")
TASK_STD = 0.02  # PEFT draws U and V from N(0, 0.02²)


# --- Config (specs/multitask_prompt_tuning.md, "The math") ---
@dataclass
class MultitaskPromptTuningConfig(PromptTuningConfig):
    """PEFT's ``MultitaskPromptTuningConfig`` (a ``PromptTuningConfig`` with tasks and ranks)."""

    peft_type: ClassVar[str] = PEFT_TYPE

    prompt_tuning_init_state_dict_path: str | None = None
    prompt_tuning_init_task: int | None = 0
    num_ranks: int | None = 1
    num_tasks: int | None = 1

    def validate(self, *, source: str = "config") -> None:
        # PromptTuningConfig's checks, with MPT's init choices (PEFT's enum, plus SAMPLE_VOCAB which its
        # PromptEmbedding honours as a plain string)
        init = self.prompt_tuning_init
        self.prompt_tuning_init = "RANDOM" if init in SOURCE_INITS else init
        try:
            super().validate(source=source)
        finally:
            self.prompt_tuning_init = init
        check_choice(source, "prompt_tuning_init", init, ("RANDOM", "SAMPLE_VOCAB", "TEXT") + SOURCE_INITS)
        for name in ("num_ranks", "num_tasks"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{source}: field {name!r} must be a positive integer, got {value!r}")
        task = self.prompt_tuning_init_task
        if task is not None and (not isinstance(task, int) or isinstance(task, bool) or task < 0):
            raise ConfigError(f"{source}: field 'prompt_tuning_init_task' must be a task id >= 0, got {task!r}")

    def table_shapes(self) -> dict[str, tuple[int, ...]]:
        """The three checkpoint tensors' shapes."""
        total, dim = self.embeddings_shape()
        return {"prompt_embeddings": (total, dim), "prefix_task_cols": (self.num_tasks, total, self.num_ranks),
                "prefix_task_rows": (self.num_tasks, self.num_ranks, dim)}


Config = MultitaskPromptTuningConfig


# --- Initialisation (specs/multitask_prompt_tuning.md, "Initialisation") ---
def init_tables(
    config: MultitaskPromptTuningConfig,
    *,
    word_embeddings: Array | None = None,
    token_ids: list[int] | None = None,
    source: Mapping[str, Array] | None = None,
    seed: int | np.random.Generator | None = 0,
    xp: Any = None,
    device: Any = None,
) -> dict[str, Array]:
    """The three tables in float32: ``P`` as prompt tuning initialises it (RANDOM ``N(0, 1)``, SAMPLE_VOCAB,
    TEXT from ``token_ids``), ``U`` and ``V`` drawn from ``N(0, 0.02²)`` on the host; then, for the source
    inits, :func:`init_from_source` replaces them from ``source`` (a trained MPT checkpoint's tensors, which
    PEFT reads from ``prompt_tuning_init_state_dict_path``)."""
    rng = host_rng(seed)
    shapes = config.table_shapes()
    init = config.prompt_tuning_init
    plain = config.replace(prompt_tuning_init="RANDOM") if init in SOURCE_INITS else config
    if xp is None and word_embeddings is not None:
        xp = namespace(word_embeddings)
    prompt = init_shared_prompt(plain, word_embeddings=word_embeddings, token_ids=token_ids, seed=rng, xp=xp,
                                device=device)
    xp = namespace(prompt)
    to = backend_for(xp)
    tables = {"prompt_embeddings": prompt}
    for key in ("prefix_task_cols", "prefix_task_rows"):
        host = (rng.standard_normal(shapes[key]) * TASK_STD).astype(np.float32)
        tables[key] = to.from_host(host, xp, device)
    if init in SOURCE_INITS:
        if source is None:
            raise ConfigError(f"{PEFT_TYPE}: prompt_tuning_init={init!r} needs source= (the source-task checkpoint's "
                              f"tensors; PEFT reads them from prompt_tuning_init_state_dict_path)")
        tables.update(init_from_source(config, source))
    return tables


def init_from_source(config: MultitaskPromptTuningConfig, source: Mapping[str, Array]) -> dict[str, Array]:
    """PEFT's source-task inits, from a trained checkpoint's ``prompt_embeddings`` / ``prefix_task_cols`` /
    ``prefix_task_rows``: ONLY_SOURCE_SHARED takes ``P`` only; EXACT_SOURCE_TASK takes ``P`` and task
    ``prompt_tuning_init_task``'s ``U``, ``V``; AVERAGE_SOURCE_TASKS takes ``P`` and the means over the
    source tasks. The last two give one task, so (as in PEFT) they need ``num_tasks = 1``."""
    init = config.prompt_tuning_init
    if init not in SOURCE_INITS:
        raise ConfigError(f"{PEFT_TYPE}: init_from_source is for prompt_tuning_init in {SOURCE_INITS}, got {init!r}")
    shapes = config.table_shapes()
    keys = ("prompt_embeddings",) if init == "ONLY_SOURCE_SHARED" else SHARED_KEYS
    missing = [k for k in keys if k not in source]
    if missing:
        raise ShapeError(f"{PEFT_TYPE}: the source state dict has no {missing} (it has {sorted(source)})")
    out = {"prompt_embeddings": source["prompt_embeddings"]}
    if init != "ONLY_SOURCE_SHARED":
        if config.num_tasks != 1:
            raise ShapeError(f"{PEFT_TYPE}: prompt_tuning_init={init!r} gives one task's U and V, but num_tasks is "
                             f"{config.num_tasks}; set num_tasks=1 (PEFT's load fails the same way)")
        xp = namespace(source["prefix_task_cols"], source["prefix_task_rows"])
        for key in ("prefix_task_cols", "prefix_task_rows"):
            a = source[key]
            if len(a.shape) != 3 or tuple(a.shape[1:]) != shapes[key][1:]:
                raise ShapeError(f"{PEFT_TYPE}: source {key} has shape {tuple(a.shape)}, expected (tasks, "
                                 f"{', '.join(map(str, shapes[key][1:]))})")
            if init == "AVERAGE_SOURCE_TASKS":
                out[key] = xp.mean(a, axis=0, keepdims=True)
            else:
                task = config.prompt_tuning_init_task or 0
                if task >= a.shape[0]:
                    raise ShapeError(f"{PEFT_TYPE}: prompt_tuning_init_task={task} but the source {key} has "
                                     f"{a.shape[0]} tasks")
                out[key] = a[task:task + 1, ...]
    if tuple(out["prompt_embeddings"].shape) != shapes["prompt_embeddings"]:
        raise ShapeError(f"{PEFT_TYPE}: source prompt_embeddings has shape {tuple(out['prompt_embeddings'].shape)}, "
                         f"the config gives {shapes['prompt_embeddings']}")
    return out


# --- Task prompts (specs/multitask_prompt_tuning.md, "The math") ---
def task_prompts(tables: Mapping[str, Array], task_ids: Array | Sequence[int]) -> Array:
    """``P ⊙ (U_{t_b} V_{t_b})`` for every batch row ``b``: ``(B, T·S, D)`` for ``B`` task ids (PEFT's
    ``MultitaskPromptEmbedding.forward``, i.e. ``get_prompt(batch_size, task_ids)``).

    >>> import numpy as np
    >>> t = {"prompt_embeddings": np.ones((2, 3)), "prefix_task_cols": np.array([[[1.], [2.]], [[0.], [1.]]]),
    ...      "prefix_task_rows": np.array([[[1., 0., 3.]], [[2., 2., 2.]]])}
    >>> task_prompts(t, [1, 0]).tolist()
    [[[0.0, 0.0, 0.0], [2.0, 2.0, 2.0]], [[1.0, 0.0, 3.0], [2.0, 0.0, 6.0]]]
    """
    prompt, cols, rows = (tables[k] for k in SHARED_KEYS)
    xp = namespace(prompt, cols, rows)
    tasks = cols.shape[0]
    if rows.shape[0] != tasks or cols.shape[2] != rows.shape[1] or cols.shape[1] != prompt.shape[0] \
            or rows.shape[2] != prompt.shape[1]:
        raise ShapeError(f"{PEFT_TYPE}: prompt_embeddings {tuple(prompt.shape)}, prefix_task_cols {tuple(cols.shape)} "
                         f"and prefix_task_rows {tuple(rows.shape)} do not fit (T·S, D), (N, T·S, r), (N, r, D)")
    if not hasattr(task_ids, "shape"):
        ids = np.asarray(list(task_ids), dtype=np.int64)
        bad = ids[(ids < 0) | (ids >= tasks)]
        if ids.ndim != 1 or bad.size:
            raise ShapeError(f"{PEFT_TYPE}: task ids must be a 1-D list in [0, {tasks}), got {ids.tolist()}")
        task_ids = backend_for(xp).from_host(ids, xp, None)
    elif len(task_ids.shape) != 1:
        raise ShapeError(f"{PEFT_TYPE}: task_ids must be 1-D (one id per batch row), got shape {tuple(task_ids.shape)}")
    task_ids = xp.astype(task_ids, xp.int64)
    if task_ids.shape[0] and (bool(xp.any(task_ids < 0)) or bool(xp.any(task_ids >= tasks))):
        raise ShapeError(f"{PEFT_TYPE}: a task id is outside [0, {tasks}) (num_tasks)")
    u = xp.take(cols, task_ids, axis=0)  # (B, T·S, r)
    v = xp.take(rows, task_ids, axis=0)  # (B, r, D)
    return prompt[None, ...] * xp.matmul(u, v)


def trainable_parameters(config: MultitaskPromptTuningConfig) -> int:
    """PEFT trains all three tables: ``T·S·D + N·T·S·r + N·r·D``."""
    return sum(int(np.prod(s)) for s in config.table_shapes().values())


# --- Checkpoint (specs/multitask_prompt_tuning.md, "PEFT compatibility") ---
def validate_checkpoint(config: MultitaskPromptTuningConfig, shared: dict[str, Array]) -> None:
    shapes = config.table_shapes()
    missing = [k for k in SHARED_KEYS if k not in shared]
    if missing:
        raise ShapeError(f"{PEFT_TYPE}: the checkpoint has no {missing} tensor(s); it has {sorted(shared)}")
    check_prompt_embeddings(config, shared["prompt_embeddings"], shapes["prompt_embeddings"])
    for key in ("prefix_task_cols", "prefix_task_rows"):
        if tuple(shared[key].shape) != shapes[key]:
            raise ShapeError(f"{PEFT_TYPE}: {key} has shape {tuple(shared[key].shape)} but the config "
                             f"(num_tasks, num_virtual_tokens, num_ranks, token_dim) gives {shapes[key]}")


#: the method's description (peftmath.methods._contract.Method): what the rest of peftmath asks
METHOD = Method(
    peft_type=PEFT_TYPE, config=MultitaskPromptTuningConfig, module=None, spec="specs/multitask_prompt_tuning.md",
    shared_keys=SHARED_KEYS, prompt_learning=True, init_field="prompt_tuning_init",
    validate_checkpoint=validate_checkpoint,
    count_trainable=lambda config, params, shared: trainable_parameters(config),
)
