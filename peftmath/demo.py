"""``peftmath demo``: the built-in example, end to end.

A small model (Linear with and without bias, an Embedding, a 3x3 and a 1x1 Conv2d, a transformers
Conv1D whose weight is stored ``(in, out)``, and a LayerNorm that no method touches) is written as
``model.safetensors`` from a fixed seed. For every implemented method and every row of the ``examples``
of its :class:`~peftmath.methods.Method` description, an adapter is initialised on the modules the
method supports, written in PEFT's format, inspected, merged through the streaming code of
``peftmath merge``, unmerged through that of ``peftmath unmerge``, and verified:

- *merge error*: ``max |W_merged - W_ref| / max |W|`` over the adapted tensors, where ``W_ref`` is
  the same adapter and base cast to float64 and merged with :meth:`~peftmath.Adapter.merge`;
- *round trip*: ``max |unmerge(merge(W)) - W| / max |W|``.

Both must stay below ``BOUND`` (1024 float32 epsilons); methods added later appear automatically.

Targets that are not modules of ``MODEL`` (LoRA's ``target_parameters``, raw 2-D and 3-D mixture-of-experts
parameters, and its ``nn.MultiheadAttention`` targets) have rows of their own, :data:`CREATED_ROWS`, built by
:func:`peftmath.create_adapter` as a user would build them, on tensors that ``model.safetensors`` holds for them
alone (:data:`EXTRA_TENSORS`, drawn from a seed of their own: the other rows' adapters, merges and numbers are as
they were without them). They run after their method's ``examples`` and are checked the same way. Two of them are
LoRA's fields that do not adapt modules of the base as they are:

- ``trainable_token_indices``: rows of the embedding table replaced beside the LoRA factors. A new adapter's rows
  are copies of the table's own (PEFT's start: the identity), so the demo replaces them with ``N(0, 1)`` draws, as
  training would, for the merge to change the table;
- ``layer_replication``: the adapter belongs to PEFT's deeper model, the replicated stack ``layers.<i>`` whose copies
  share their base weights (:func:`peftmath.methods.lora_replication.replicate_state`). The demo creates the adapter
  on that model, writes the folder as PEFT does (the config keeps ``layer_replication``), reads it back with
  :func:`~peftmath.methods.lora_replication.load_replicated` (``peftmath.load_adapter`` refuses it by name) and
  merges it into the replicated model, written beside the adapter as ``<row>-base.safetensors``: every copy gets
  its own ``W_i + ΔW_copy`` (PEFT's unmerged model).
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

__all__ = ["MODEL", "LAYER_KINDS", "EXTRA_TENSORS", "CREATED_ROWS", "CreatedRow", "build_model", "build_extra",
           "run_demo", "BOUND"]

#: relative error bound of the demo's float32 model (1024 float32 epsilons)
BOUND = 1024 * float(np.finfo(np.float32).eps)
SEED = 20240601

#: module name -> (layer kind, weight shape, has bias)
MODEL: dict[str, tuple[str, tuple[int, ...], bool]] = {
    "embed": ("Embedding", (40, 24), False),
    "fc_in": ("Linear", (32, 24), True),
    "fc_out": ("Linear", (24, 32), False),
    "conv3x3": ("Conv2d", (8, 4, 3, 3), True),
    "conv1x1": ("Conv2d", (6, 8, 1, 1), False),
    "attn.c_attn": ("Conv1D", (24, 72), True),  # transformers Conv1D: (in, out), not square
}
#: layer kinds passed to every merge (the Conv1D weight's layout cannot be told from its shape alone)
LAYER_KINDS = {name: kind for name, (kind, _, _) in MODEL.items()}

#: tensors of ``model.safetensors`` that only the :data:`CREATED_ROWS` adapt (key -> shape), in the order a PyTorch
#: ``state_dict()`` registers them: a transformers mixture-of-experts block (``experts.gate_up_proj`` ``(E, 2I, H)``,
#: ``experts.down_proj`` ``(E, H, I)``, E = 4 experts, H = 24, I = 8, not transposed, and its 2-D router) and a
#: packed ``nn.MultiheadAttention`` of embedding size 24
EXTRA_TENSORS: dict[str, tuple[int, ...]] = {
    "experts.gate_up_proj": (4, 16, 24),
    "experts.down_proj": (4, 24, 8),
    "router.weight": (4, 24),
    "mha.in_proj_weight": (72, 24),
    "mha.in_proj_bias": (72,),
    "mha.out_proj.weight": (24, 24),
    "mha.out_proj.bias": (24,),
    # a stack of 3 layers (a projection and a norm each) that the layer_replication row replicates
    **{f"layers.{i}.{leaf}": shape for i in range(3) for leaf, shape in (("q.weight", (16, 24)), ("ln.weight", (24,)))},
}


class CreatedRow(NamedTuple):
    """A demo row built by :func:`peftmath.create_adapter` from ``fields`` (a config dict of method ``peft_type``)
    on the demo's ``model.safetensors``; ``extra``: the :data:`EXTRA_TENSORS` it adapts (or reads, as biases)."""

    peft_type: str
    fields: dict[str, Any]
    extra: tuple[str, ...]


#: rows whose targets are not modules of ``MODEL`` (label -> row); ``init_lora_weights=False``: B is random too, so
#: the merge changes the weights
CREATED_ROWS: dict[str, CreatedRow] = {
    "LoRA target_parameters (MoE experts)": CreatedRow(
        "LORA", {"r": 4, "lora_alpha": 8, "init_lora_weights": False, "target_modules": [],
                 "target_parameters": ["experts.gate_up_proj", "experts.down_proj", "router.weight"]},
        ("experts.gate_up_proj", "experts.down_proj", "router.weight")),
    "LoRA nn.MultiheadAttention": CreatedRow(
        "LORA", {"r": 4, "lora_alpha": 8, "init_lora_weights": False, "target_modules": ["mha"]},
        ("mha.in_proj_weight", "mha.in_proj_bias", "mha.out_proj.weight", "mha.out_proj.bias")),
    # five rows of the model's embedding (its dict form: the table is not called embed_tokens); the rows stand in
    # for trained ones (N(0, 1) draws, see the module docstring)
    "LoRA trainable_token_indices": CreatedRow(
        "LORA", {"r": 4, "lora_alpha": 8, "init_lora_weights": False, "target_modules": ["fc_in", "fc_out"],
                 "trainable_token_indices": {"embed": [1, 5, 6, 7, 30]}},
        ()),
    # base layers 0 1 2 -> new layers 0 1 2 3 = base 0 1 1 2: two copies of layer 1, each with its own LoRA
    "LoRA layer_replication": CreatedRow(
        "LORA", {"r": 4, "lora_alpha": 8, "init_lora_weights": False, "target_modules": ["q"],
                 "layer_replication": [[0, 2], [1, 3]]},
        tuple(f"layers.{i}.{leaf}" for i in range(3) for leaf in ("q.weight", "ln.weight"))),
}


def build_model(seed: int = SEED) -> dict[str, np.ndarray]:
    """The demo model's float32 state dict, drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    state: dict[str, np.ndarray] = {}
    for name, (_, shape, bias) in MODEL.items():
        fan_in = int(np.prod(shape[1:])) if len(shape) > 2 else shape[1]
        state[f"{name}.weight"] = (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)
        if bias:
            out = shape[1] if MODEL[name][0] == "Conv1D" else shape[0]
            state[f"{name}.bias"] = (0.1 * rng.standard_normal(out)).astype(np.float32)
    state["norm.weight"] = (1 + 0.1 * rng.standard_normal(24)).astype(np.float32)
    return state


def build_extra(seed: int = SEED + 1) -> dict[str, np.ndarray]:
    """The float32 :data:`EXTRA_TENSORS`, drawn from ``seed`` (not the model's: the model stays as it was);
    weights ``N(0, 1/fan_in)`` with fan_in the last axis, biases ``N(0, 0.01)``."""
    rng = np.random.default_rng(seed)
    return {k: (rng.standard_normal(s) / (np.sqrt(s[-1]) if len(s) > 1 else 10)).astype(np.float32)
            for k, s in EXTRA_TENSORS.items()}


def _created_rows(peft_type: str) -> list[tuple[str, CreatedRow]]:
    return [(label, row) for label, row in CREATED_ROWS.items() if row.peft_type == peft_type]


def _create_row(peft_type: str, row: CreatedRow, state: dict[str, np.ndarray],
                seed: int) -> tuple[Any, Any, dict[str, np.ndarray] | None]:
    """``(adapter to save, adapter that merges, its base)`` of a created row, from ``create_adapter(..., seed=seed)``
    on the demo's ``state``; the base is None where it is ``state`` itself. With ``trainable_token_indices`` the
    table's rows the adapter starts with are replaced by ``N(0, 1)`` draws (from ``seed``); with
    ``layer_replication`` the adapter is created on the replicated state (the base it merges into) and saved with
    the field, which the merging adapter (as :func:`~peftmath.methods.lora_replication.load_replicated` reads it)
    does not have."""
    from .adapter import Adapter
    from .create import create_adapter
    from .methods._lora_tokens import TOKENS_KEY
    from .methods.lora_replication import FIELD, replicate_state

    missing = [k for k in row.extra if k not in state]
    if missing:
        raise ValueError(f"needs {', '.join(missing)}, which EXTRA_TENSORS does not hold")
    fields = dict(row.fields)
    layer_map = fields.pop(FIELD, None)
    base = None if layer_map is None else replicate_state(state, layer_map)[0]
    adapter, new_weights = create_adapter(state if base is None else base, {"peft_type": peft_type, **fields},
                                          seed=seed, return_base=True)
    if new_weights:
        base = {**(state if base is None else base), **{k: np.asarray(v) for k, v in new_weights.items()}}
    rng = np.random.default_rng(seed)
    params = {m: {**p, TOKENS_KEY: rng.standard_normal(tuple(p[TOKENS_KEY].shape)).astype(np.float32)}
              if TOKENS_KEY in p else p for m, p in adapter.params.items()}
    merging = Adapter(adapter.config, params, shared=adapter.shared, layer_kinds=adapter.layer_kinds,
                      model_type=adapter.model_type)
    if layer_map is None:
        return merging, merging, base
    return (Adapter(adapter.config.replace(**{FIELD: layer_map}), params, shared=adapter.shared,
                    layer_kinds=adapter.layer_kinds, model_type=adapter.model_type), merging, base)


def _load_replicated(folder: Path, state: dict[str, np.ndarray],
                     replicated: dict[str, np.ndarray]) -> tuple[Any, dict[str, Any]]:
    """``(adapter, inspect-like info)`` of a ``layer_replication`` folder, read as a user reads it
    (:func:`~peftmath.methods.lora_replication.load_replicated` with the demo's base ``state``); the replicated model
    it builds must be ``replicated``, the one the adapter was created on (:class:`~peftmath.errors.ShapeError`)."""
    from .errors import ShapeError
    from .methods.lora_replication import load_replicated

    loaded, theirs, _ = load_replicated(folder, state)
    differ = sorted(set(theirs) ^ set(replicated)) or [k for k in theirs
                                                        if not np.array_equal(theirs[k], replicated[k])]
    if differ:
        raise ShapeError(f"{folder}: load_replicated builds another replicated model than the demo's ({differ[:4]})")
    return loaded, {"num_modules": len(loaded.modules), "trainable_parameters": loaded.num_trainable_parameters()}


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", label).strip("-").lower() or "example"


def _build_adapter(method: Any, label: str, fields: dict, state: dict[str, np.ndarray], seed: int,
                   left_out: list[tuple[str, str]] | None = None):
    """``(Adapter, new base weights)`` of one example row of ``method`` (a :class:`~peftmath.methods.Method`)
    on every module of the model whose layer kind the method supports, less those whose kind the row's config
    refuses (``initialize`` raises :class:`~peftmath.errors.UnsupportedError`: KaSA runs on nn.Linear only),
    which are appended to ``left_out`` as ``(module, reason)``."""
    from .adapter import Adapter
    from .errors import UnsupportedError
    from .layers import Layer

    targets = [n for n, (k, _, b) in MODEL.items() if method.supports(k) and (b or not method.bias_only)]
    if not targets:
        kinds = ", ".join(k.value for k in method.layer_kinds) or "none"
        raise ValueError(f"supports none of the demo's layer kinds ({kinds})")
    config = method.config(**fields, target_modules=targets)
    config.validate(source=f"EXAMPLES[{label!r}]")
    params: dict[str, dict[str, Any]] = {}
    shared: dict[str, Any] = {}
    new_weights: dict[str, np.ndarray] = {}
    left_out = [] if left_out is None else left_out
    layers = {name: Layer.of(MODEL[name][1], MODEL[name][0]) for name in targets}
    if method.init_shared is not None:  # tensors shared by all modules (VeRA's projections)
        shared.update(method.init_shared(config, list(layers.values())))
    for j, name in enumerate(targets):
        try:
            p, new_w = method.initialize(name, config, layers[name], weight=state[f"{name}.weight"], seed=seed + j,
                                         shared=shared)
        except UnsupportedError as exc:  # this row's variant does not run on this layer kind
            left_out.append((name, str(exc)))
            continue
        p = method.example_params(p, seed + j)
        for k in list(p):
            if method.is_shared(k):
                shared.setdefault(k, p.pop(k))
        params[name] = p
        if new_w is not None:
            new_weights[f"{name}.weight"] = np.asarray(new_w)
    if not params:
        raise ValueError("; ".join(reason for _, reason in left_out))
    if left_out:
        config = config.replace(target_modules=list(params))
    return Adapter(config, params, shared=shared), new_weights


def _to64(a: Any) -> np.ndarray:
    return np.asarray(a).astype(np.float64)


def _adapter64(adapter: Any) -> Any:
    """``adapter`` with every tensor cast to float64 (the reference)."""
    from .adapter import Adapter

    return Adapter(adapter.config, {m: {s: _to64(a) for s, a in p.items()} for m, p in adapter.params.items()},
                   shared={k: _to64(v) for k, v in adapter.shared.items()},
                   other={k: _to64(v) for k, v in adapter.other.items()})


def _verify(adapter: Any, base_state: dict, merged: dict, unmerged: dict) -> tuple[float, float, list[str]]:
    """(merge error, round-trip error, adapted keys) relative to max |W| per tensor."""
    ad64 = _adapter64(adapter)
    state64 = {k: _to64(v) for k, v in base_state.items()}
    ref = ad64.merge(state64, layer_kinds=LAYER_KINDS)
    keys = sorted({k for m in adapter.modules for k in adapter.weight_keys(m, base_state) if k in base_state})
    merge_err = rt_err = 0.0
    for k in keys:
        scale = max(float(np.max(np.abs(state64[k]))), 1e-30)
        merge_err = max(merge_err, float(np.max(np.abs(_to64(merged[k]) - ref[k]))) / scale)
        rt_err = max(rt_err, float(np.max(np.abs(_to64(unmerged[k]) - state64[k]))) / scale)
    for k in base_state:  # untouched tensors: bit for bit
        if k not in keys and not np.array_equal(np.asarray(merged[k]), base_state[k]):
            merge_err = float("inf")
    return merge_err, rt_err, keys


def _sample_input(layer: Any, rng: np.random.Generator) -> np.ndarray:
    """The demo's forward input for ``layer``: token ids ``(2, 7)`` (Embedding), ``(2, in, 6, 6)`` (Conv2d),
    else ``(2, 7, in)`` (2 rows of 7 tokens), float32."""
    from .layers import LayerKind

    if layer.kind is LayerKind.EMBEDDING:
        return rng.integers(0, layer.weight_shape[0], size=(2, 7))
    if layer.kind.is_conv:
        return rng.standard_normal((2, layer.in_features, *(k + 3 for k in layer.kernel_size))).astype(np.float32)
    return rng.standard_normal((2, 7, layer.in_features)).astype(np.float32)


def _verify_forward(adapter: Any, reference: Any, base_state: dict, kwargs: dict, seed: int) -> tuple[float, float]:
    """(forward error, adapter effect) of a forward-only example, relative to max |y_ref| per module:
    ``max |y - y_ref|`` with ``y_ref`` the float64 reference adapter's forward on the float64 base, and
    ``max |y_ref - base(x)|`` (0 would mean the row changes nothing)."""
    from .layers import Layer

    rng = np.random.default_rng(seed)
    state64 = {k: _to64(v) for k, v in base_state.items()}
    err = effect = 0.0
    for name in adapter.modules:
        kind, shape, _ = MODEL[name]
        layer = Layer.of(shape, kind)
        x = _sample_input(layer, rng)
        x64 = x if x.dtype.kind == "i" else _to64(x)
        y = _to64(adapter.forward(name, x, base_state, kind=kind, **kwargs))
        y64 = _to64(reference.forward(name, x64, state64, kind=kind, **kwargs))
        base = _to64(layer.base_forward(x64, state64[f"{name}.weight"], state64.get(f"{name}.bias"), np))
        scale = max(float(np.max(np.abs(y64))), 1e-30)
        err = max(err, float(np.max(np.abs(y - y64))) / scale)
        effect = max(effect, float(np.max(np.abs(y64 - base))) / scale)
    return err, effect


def _count_examples(peft_types: Any, describe: Any) -> int:
    """How many examples the demo will run (the progress bar's total); a method that fails to import
    counts none (the demo skips it)."""
    n = 0
    for peft_type in peft_types:
        try:
            method = describe(peft_type)
        except Exception:  # noqa: BLE001 - the demo reports it when it gets there
            continue
        n += len(method.examples) + len(method.forward_examples) + len(_created_rows(peft_type)) \
            if method.merges_weights else 0
    return n


def run_demo(directory: str | None = None, *, force: bool = False, quiet: bool = False, log: Any = None,
             json_output: bool = False, progress: Any = None) -> int:
    """Run the demo; print the table on stdout (``json_output``: the results as JSON, see
    ``peftmath demo --help``); return the exit status (1 if a bound is exceeded). ``progress(total)``, when
    given, returns ``(update, close)`` of a progress bar over the ``total`` examples (``update`` may be None)."""
    from .create import create_adapter
    from .errors import PeftMathError, ShapeError, UnsupportedError
    from .inspect import inspect_adapter, text_table
    from .io import load_adapter, save_adapter
    from .io.safetensors import load_file, save_file
    from .io.stream import open_model, read_records, records_path, transform
    from .methods import describe_method, implemented_methods

    tmp = directory is None
    root = Path(tempfile.mkdtemp(prefix="peftmath-demo-")) if tmp else Path(directory)
    if not tmp:
        if root.exists() and any(root.iterdir()) and not force:
            from .errors import CheckpointError

            raise CheckpointError(f"{root}: folder is not empty; pass --force to write the demo into it anyway")
        root.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    rows: list[list[str]] = []
    results: list[dict[str, Any]] = []
    fwd_rows: list[list[str]] = []  # forward-only examples (merge refused): a table of their own
    fwd_results: list[dict[str, Any]] = []
    failed: list[str] = []
    update, close = (None, lambda: None)
    try:
        state = {**build_model(), **build_extra()}
        base_path = root / "model.safetensors"
        save_file(state, base_path, metadata={"format": "pt", "source": "peftmath demo"})
        if not quiet:
            n = sum(v.size for v in state.values())
            print(f"model: {base_path} ({len(MODEL)} layers and {len(EXTRA_TENSORS)} tensors for the rows "
                  f"create_adapter builds, {n:,} parameters, float32)", file=sys.stderr)
        row_seed = 0
        created_seed = 0  # the created rows' own seeds (SEED - 100 k), so the examples' seeds stay as they were
        if progress is not None:
            update, close = progress(_count_examples(implemented_methods(), describe_method))
        for peft_type in implemented_methods():
            try:
                method = describe_method(peft_type)
            except Exception as exc:  # a method module that fails to import must not stop the demo
                print(f"peftmath demo: skipping {peft_type}: {type(exc).__name__}: {exc}", file=sys.stderr)
                continue
            examples = [(label, fields, None, None) for label, fields in method.examples.items()]
            examples += [(label, fields, kw, None) for label, (fields, kw) in method.forward_examples.items()]
            examples += [(label, row.fields, None, row) for label, row in _created_rows(peft_type)]
            missing = [r for r in method.requires if importlib.util.find_spec(r) is None]
            if missing and examples:
                if not quiet:
                    print(f"peftmath demo: {peft_type} needs {', '.join(missing)} (pip install {' '.join(missing)}); "
                          f"skipped", file=sys.stderr)
                continue
            if not examples or not method.merges_weights:
                if not quiet:
                    print(f"peftmath demo: {peft_type} has no weight-merging examples; skipped", file=sys.stderr)
                continue
            for label, fields, forward_kwargs, created in examples:
                if update is not None:
                    update(1)  # examples started
                t0 = time.perf_counter()
                left_out: list[tuple[str, str]] = []
                try:
                    if created is None:
                        row_seed += 100
                        adapter, new_weights = _build_adapter(method, label, dict(fields), state, SEED + row_seed,
                                                              left_out)
                        saved, row_base = adapter, ({**state, **new_weights} if new_weights else None)
                    else:  # targets that are not modules of MODEL: create_adapter finds them in the state
                        created_seed += 1
                        saved, adapter, row_base = _create_row(peft_type, created, state, SEED - 100 * created_seed)
                except Exception as exc:
                    print(f"peftmath demo: skipping {label} ({peft_type}): {type(exc).__name__}: {exc}",
                          file=sys.stderr)
                    continue
                if left_out and not quiet:
                    print(f"peftmath demo: {label} ({peft_type}) leaves out {', '.join(n for n, _ in left_out)}, "
                          f"whose layer kinds it does not run on ({left_out[0][1]})", file=sys.stderr)
                slug = _slug(label)
                ex_base_path = base_path
                ex_state = state
                if row_base is not None:  # the init changed the base (PiSSA-like), or replicated layers: its own base
                    ex_state = row_base
                    ex_base_path = root / f"{slug}-base.safetensors"
                    save_file(ex_state, ex_base_path, metadata={"format": "pt"})
                adir = root / f"adapter-{slug}"
                if adir.exists():
                    shutil.rmtree(adir)
                try:
                    save_adapter(saved, adir)
                    if saved is adapter:
                        info = inspect_adapter(adir, base=open_model(ex_base_path), layer_kinds=LAYER_KINDS)
                        if info["problems"]:
                            raise ShapeError("; ".join(info["problems"]))
                        loaded = load_adapter(adir)
                    else:  # layer_replication: the folder is an adapter of the replicated model
                        loaded, info = _load_replicated(adir, state, ex_state)
                    merged_path = root / f"merged-{slug}.safetensors"
                    if forward_kwargs is not None:  # a forward-only row: its forward, and merge refused
                        fwd_err, effect = _verify_forward(loaded, _adapter64(adapter), ex_state, dict(forward_kwargs),
                                                          SEED + row_seed)
                        try:
                            transform(open_model(ex_base_path), [loaded], merged_path, layer_kinds=LAYER_KINDS,
                                      force=True, names=[str(adir)])
                            refusal = None
                        except UnsupportedError as exc:
                            refusal = str(exc)
                        ok = fwd_err <= BOUND and effect > BOUND and refusal is not None
                        if not ok:
                            failed.append(label)
                        if refusal is not None and not quiet:
                            print(f"peftmath demo: {label} ({peft_type}): merge refused, as it must be: {refusal}",
                                  file=sys.stderr)
                        seconds = time.perf_counter() - t0
                        fwd_rows.append([label, peft_type, str(info["num_modules"]), f"{info['trainable_parameters']:,}",
                                         f"{fwd_err:.2e}", f"{effect:.2e}", "refused" if refusal else "NOT REFUSED",
                                         f"{seconds:.2f} s", "ok" if ok else "FAIL"])
                        fwd_results.append({"example": label, "method": peft_type, "modules": info["num_modules"],
                                            "trainable_parameters": info["trainable_parameters"],
                                            "forward_error": fwd_err, "adapter_effect": effect,
                                            "merge_refused": refusal, "seconds": round(seconds, 3),
                                            "check": "ok" if ok else "fail"})
                        continue
                    unmerged_path = root / f"unmerged-{slug}.safetensors"
                    transform(open_model(ex_base_path), [loaded], merged_path, layer_kinds=LAYER_KINDS, force=True,
                              names=[str(adir)])
                    transform(open_model(merged_path), [loaded], unmerged_path, direction="unmerge",
                              layer_kinds=LAYER_KINDS, force=True, records=read_records(records_path(merged_path)),
                              names=[str(adir)])
                    merge_err, rt_err, _ = _verify(adapter, ex_state, load_file(merged_path),
                                                   load_file(unmerged_path))
                except PeftMathError as exc:  # a real failure of an implemented method: report it, go on
                    print(f"peftmath demo: {label} ({peft_type}) failed: {exc}", file=sys.stderr)
                    failed.append(label)
                    if forward_kwargs is not None:
                        fwd_rows.append([label, peft_type, "-", "-", "-", "-", "-", f"{time.perf_counter() - t0:.2f} s",
                                         "ERROR"])
                        fwd_results.append({"example": label, "method": peft_type, "check": "error", "error": str(exc)})
                        continue
                    rows.append([label, peft_type, "-", "-", "-", "-", f"{time.perf_counter() - t0:.2f} s", "ERROR"])
                    results.append({"example": label, "method": peft_type, "modules": None, "trainable_parameters": None,
                                    "merge_error": None, "round_trip_error": None,
                                    "seconds": round(time.perf_counter() - t0, 3), "check": "error", "error": str(exc)})
                    continue
                ok = merge_err <= BOUND and rt_err <= BOUND
                if not ok:
                    failed.append(label)
                rows.append([label, peft_type, str(info["num_modules"]), f"{info['trainable_parameters']:,}",
                             f"{merge_err:.2e}", f"{rt_err:.2e}", f"{time.perf_counter() - t0:.2f} s",
                             "ok" if ok else "FAIL"])
                results.append({"example": label, "method": peft_type, "modules": info["num_modules"],
                                "trainable_parameters": info["trainable_parameters"], "merge_error": float(merge_err),
                                "round_trip_error": float(rt_err), "seconds": round(time.perf_counter() - t0, 3),
                                "check": "ok" if ok else "fail"})
        close()
        if json_output:
            import json

            print(json.dumps({"examples": results, "forward_examples": fwd_results, "bound": BOUND, "failed": failed,
                              "seconds": round(time.perf_counter() - t_all, 3)}, indent=2, allow_nan=False))
        else:
            print(text_table(rows, ["example", "method", "modules", "trainable", "merge err", "round trip", "time",
                                "check"]))
            if fwd_rows:
                print("\nforward only (merge refused):")
                print(text_table(fwd_rows, ["example", "method", "modules", "trainable", "forward err", "effect",
                                            "merge", "time", "check"]))
        if not quiet:
            if fwd_rows:
                print("forward only: forward err = max |y - y_ref| / max |y_ref| per module, y_ref = float64 forward; "
                      "effect = max |y_ref - base(x)| / max |y_ref| (must exceed the bound)", file=sys.stderr)
            print(f"errors: max |W - W_ref| / max |W| per tensor, W_ref = float64 merge; bound {BOUND:.1e}. "
                  f"{len(rows) + len(fwd_rows)} examples in {time.perf_counter() - t_all:.2f} s"
                  + ("" if tmp else f"; files in {root}"), file=sys.stderr)
    finally:
        close()
        if tmp:
            shutil.rmtree(root, ignore_errors=True)
    if failed:
        print(f"peftmath: error: verification failed for {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
