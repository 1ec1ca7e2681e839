"""``create_adapter`` with LoRA's ``layer_replication`` (issue 18): the adapter is the replicated (deeper) model's,
as PEFT builds it: a module on every new layer, the copies with factors of their own from PEFT's init distributions
and their own seed streams, the field kept in the config; the same tensors as the demo's construction (replicate,
create without the field, save with it); merged into the replicated state against a float64 ``W_i + s·B_j A_j``
per copy; what cannot be built is refused naming the field.
(PEFT: tests/parity/test_create_lora_replication_parity.py.)"""

from __future__ import annotations

import numpy as np
import pytest

import peftmath as pm
from peftmath.demo import CREATED_ROWS, EXTRA_TENSORS, CreatedRow, _create_row
from peftmath.errors import ConfigError, ShapeError, UnsupportedError
from peftmath.io.safetensors import save_file
from peftmath.methods.lora_replication import (distinct_arrays, load_replicated, replicate_state, replicated_order,
                                               replicated_view)

IN, OUT = 48, 32


def _base(n: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    state = {"model.embed_tokens.weight": rng.standard_normal((10, IN)).astype(np.float32)}
    for i in range(n):
        state[f"model.layers.{i}.q.weight"] = rng.standard_normal((OUT, IN)).astype(np.float32)
        state[f"model.layers.{i}.o.weight"] = rng.standard_normal((IN, OUT)).astype(np.float32)
        state[f"model.layers.{i}.ln.weight"] = rng.standard_normal(IN).astype(np.float32)
    return state


def _cfg(layer_map, **kw):
    return {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q", "o"], "layer_replication": layer_map,
            **kw}


@pytest.mark.parametrize("layer_map", [[[0, 2], [1, 3]], [[2, 3], [0, 2]], [[0, 3], [0, 3]], [[1, 2]]])
def test_a_module_on_every_replicated_layer(layer_map):
    state = _base()
    ad = pm.create_adapter(state, _cfg(layer_map))
    n = len(replicated_order(layer_map, 3))
    assert ad.modules == sorted(f"model.layers.{j}.{m}" for j in range(n) for m in ("q", "o"))
    assert ad.config.layer_replication == layer_map  # PEFT replicates on load
    for j in range(n):
        assert ad.params[f"model.layers.{j}.q"]["lora_A.weight"].shape == (4, IN)
        assert ad.params[f"model.layers.{j}.q"]["lora_B.weight"].shape == (OUT, 4)
        assert ad.params[f"model.layers.{j}.o"]["lora_A.weight"].shape == (4, OUT)


@pytest.mark.parametrize("seed", [0, 7])
@pytest.mark.parametrize("init", [False, True, "gaussian"])
def test_equals_the_demo_s_construction(seed, init):
    """The demo builds its layer_replication row by hand (replicate_state, create_adapter without the field, the
    field set again); create_adapter with the field gives the same adapter for the same seed."""
    rng = np.random.default_rng(1)
    state = {k: rng.standard_normal(s).astype(np.float32) for k, s in EXTRA_TENSORS.items()}
    row = CREATED_ROWS["LoRA layer_replication"]
    row = CreatedRow(row.peft_type, {**row.fields, "init_lora_weights": init}, row.extra)
    saved, _, _ = _create_row("LORA", row, state, seed)
    ad = pm.create_adapter(state, {"peft_type": "LORA", **row.fields}, seed=seed)
    assert ad.config == saved.config and ad.config.layer_replication == [[0, 2], [1, 3]]
    assert ad.modules == saved.modules == [f"layers.{j}.q" for j in range(4)]
    for m, p in saved.params.items():
        assert sorted(ad.params[m]) == sorted(p)
        for k, v in p.items():
            assert np.array_equal(ad.params[m][k], v), (m, k)


def test_copies_have_their_own_factors_from_peft_s_distributions():
    state = _base()
    layer_map = [[0, 3], [0, 3], [1, 2]]  # base layer 1 three times
    copies = [j for j, i in enumerate(replicated_order(layer_map, 3)) if i == 1]
    ad = pm.create_adapter(state, _cfg(layer_map, r=16), seed=5)
    bound = 1 / np.sqrt(IN)  # PEFT: kaiming_uniform_(lora_A, a=√5), U(-1/√in, 1/√in); lora_B zeros
    a = [ad.params[f"model.layers.{j}.q"]["lora_A.weight"].astype(np.float64) for j in copies]
    for x in a:
        assert np.abs(x).max() <= bound and abs(x.std() - bound / np.sqrt(3)) < 0.05 * bound / np.sqrt(3)
    for j in copies:
        assert not np.any(ad.params[f"model.layers.{j}.q"]["lora_B.weight"])
    assert all(not np.array_equal(a[s], a[t]) for s in range(3) for t in range(s))
    g = pm.create_adapter(state, _cfg(layer_map, r=16, init_lora_weights="gaussian"), seed=5)
    for j in copies:  # PEFT: normal_(lora_A, std=1/r)
        x = g.params[f"model.layers.{j}.q"]["lora_A.weight"].astype(np.float64)
        assert abs(x.std() - 1 / 16) < 0.05 / 16 and abs(x.mean()) < 0.1 / 16
    # reproducible: the same seed, the same factors; another seed, others
    again = pm.create_adapter(state, _cfg(layer_map, r=16), seed=5)
    other = pm.create_adapter(state, _cfg(layer_map, r=16), seed=6)
    for m in ad.modules:
        assert np.array_equal(again.params[m]["lora_A.weight"], ad.params[m]["lora_A.weight"])
        assert not np.array_equal(other.params[m]["lora_A.weight"], ad.params[m]["lora_A.weight"])


def test_layers_to_transform_counts_the_new_layers():
    state = _base()
    ad = pm.create_adapter(state, _cfg([[0, 2], [1, 3]], layers_to_transform=[2, 3]))
    assert ad.modules == ["model.layers.2.o", "model.layers.2.q", "model.layers.3.o", "model.layers.3.q"]


def test_merged_into_the_replicated_state_per_copy():
    state = _base()
    keep = {k: v.copy() for k, v in state.items()}
    layer_map = [[0, 2], [1, 3]]
    ad = pm.create_adapter(state, _cfg(layer_map, init_lora_weights=False, lora_alpha=6), seed=2)
    with pytest.raises(ShapeError, match="model.layers.3.o"):  # not an adapter of the base as it is
        ad.merge(state)
    plain, replicated = replicated_view(ad, state)
    with pytest.raises(UnsupportedError, match="layer_replication"):  # the field: refused as a plain LoRA
        ad.merge(replicated)
    assert plain.config.layer_replication is None and sorted(replicated) == sorted(replicate_state(state, layer_map)[0])
    merged = plain.merge(replicated)
    order = replicated_order(layer_map, 3)
    for j, i in enumerate(order):
        for m in ("q", "o"):
            p = ad.params[f"model.layers.{j}.{m}"]
            want = (state[f"model.layers.{i}.{m}.weight"].astype(np.float64)
                    + 6 / 4 * p["lora_B.weight"].astype(np.float64) @ p["lora_A.weight"].astype(np.float64))
            np.testing.assert_allclose(np.asarray(merged[f"model.layers.{j}.{m}.weight"]), want, rtol=1e-5, atol=1e-5)
        assert np.array_equal(merged[f"model.layers.{j}.ln.weight"], state[f"model.layers.{i}.ln.weight"])
    assert not np.array_equal(merged["model.layers.1.q.weight"], merged["model.layers.2.q.weight"])
    for k, v in keep.items():  # the base's arrays are untouched
        assert np.array_equal(state[k], v), k
    # PEFT counts a shared parameter once: the distinct arrays are the kept base layers' and the rest
    assert sorted(distinct_arrays(replicated)) == sorted(k for k in replicated if not k.startswith("model.layers.2."))


def test_saved_adapter_reads_back_with_load_replicated(tmp_path):
    state = _base()
    ad = pm.create_adapter(state, _cfg([[0, 2], [1, 3]], init_lora_weights=False), seed=3)
    pm.save_adapter(ad, tmp_path / "a")
    with pytest.raises(UnsupportedError, match=r"layer_replication=\[\[0, 2\], \[1, 3\]\]"):
        pm.load_adapter(tmp_path / "a")
    loaded, replicated, _ = load_replicated(tmp_path / "a", state)
    assert loaded.modules == ad.modules
    for m in ad.modules:
        for k, v in ad.params[m].items():
            assert np.array_equal(np.asarray(loaded.params[m][k]), v)
    assert all(replicated[k] is v for k, v in replicate_state(state, [[0, 2], [1, 3]])[0].items())


def test_a_safetensors_base_gives_the_same_adapter(tmp_path):
    state = _base()
    save_file(state, tmp_path / "model.safetensors")
    a = pm.create_adapter(state, _cfg([[0, 2], [1, 3]]), seed=4)
    b = pm.create_adapter(tmp_path / "model.safetensors", _cfg([[0, 2], [1, 3]]), seed=4)
    assert a.modules == b.modules and a.config == b.config
    for m in a.modules:
        assert all(np.array_equal(a.params[m][k], b.params[m][k]) for k in a.params[m])


@pytest.mark.parametrize("layer_map, error, pattern", [
    ([[0, 4]], ConfigError, r"layer_replication: range \[0, 4\] .*the base has 3 layers"),
    ([[2, 1]], ConfigError, r"layer_replication: range \[2, 1\]"),
    ([], ConfigError, r"layer_replication must be a non-empty list"),
    ("0-2", ConfigError, r"layer_replication must be a non-empty list"),
])
def test_a_layer_map_that_does_not_fit_is_refused(layer_map, error, pattern):
    with pytest.raises(error, match=pattern):
        pm.create_adapter(_base(), _cfg(layer_map))


def test_a_model_without_a_stack_of_layers_is_refused():
    state = {"transformer.h.0.q.weight": np.zeros((4, 4), np.float32)}  # PEFT's walk does not find transformer.h
    with pytest.raises(ShapeError, match=r"layer_replication: no stack of layers"):
        pm.create_adapter(state, _cfg([[0, 1]], target_modules=["q"]))


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_an_init_that_changes_the_shared_base_weights_is_refused(init):
    with pytest.raises(UnsupportedError, match=rf"layer_replication=\[\[0, 2\], \[1, 3\]\] with "
                                               rf"init_lora_weights='{init}'.*share one base weight"):
        pm.create_adapter(_base(), _cfg([[0, 2], [1, 3]], init_lora_weights=init), return_base=True)
