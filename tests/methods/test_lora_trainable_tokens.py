"""LoRA with trainable tokens (PEFT's ``LoraConfig.trainable_token_indices``): a LoRA adapter whose checkpoint also
holds ``<module>.token_adapter.trainable_tokens_delta`` rows. Merge, unmerge, forward and the streamed command
against an independent NumPy reference (a row-by-row loop for the rows, float64 ``W + s·BA`` for the LoRA
modules), the list and dict forms of the field, save / load round trips, and the refusals (a module with both
LoRA tensors and rows, rows the config does not name, scale, delta weight, AdaLoRA)."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest

import peftmath as pm
from peftmath import cli
from peftmath.errors import CheckpointError, ConfigError, NotInvertibleError, ShapeError, UnsupportedError
from peftmath.io.safetensors import save_file
from peftmath.methods.lora import LoraConfig

V, D = 17, 6
KEY = "token_adapter.trainable_tokens_delta"


def _config(indices, **kw):
    cfg = LoraConfig(r=2, lora_alpha=6, target_modules=["q"], trainable_token_indices=indices, **kw)
    cfg.validate()
    return cfg


def _case(seed=0, indices=(3, 9, 1), dtype=np.float32, table="embed_tokens"):
    rng = np.random.default_rng(seed)
    params = {"q": {"lora_A.weight": rng.standard_normal((2, D)).astype(np.float32),
                    "lora_B.weight": rng.standard_normal((D, 2)).astype(np.float32)},
              table: {KEY: rng.standard_normal((len(indices), D)).astype(np.float32)}}
    state = {"q.weight": rng.standard_normal((D, D)).astype(dtype), "q.bias": rng.standard_normal(D).astype(dtype),
             f"{table}.weight": rng.standard_normal((V, D)).astype(dtype)}
    return params, state


def _reference(state, params, indices, table="embed_tokens"):
    """The merged model computed independently: rows replaced one at a time (cast to the table's dtype), and
    ``W + s·B A`` in float64 rounded once for the LoRA module (s = 6 / 2)."""
    out = dict(state)
    W = np.array(state[f"{table}.weight"], copy=True)
    for j, t in enumerate(indices):
        W[t] = params[table][KEY][j].astype(W.dtype)
    out[f"{table}.weight"] = W
    A, B = (params["q"][k].astype(np.float64) for k in ("lora_A.weight", "lora_B.weight"))
    out["q.weight"] = (state["q.weight"].astype(np.float64) + 3.0 * B @ A).astype(state["q.weight"].dtype)
    return out


@pytest.mark.parametrize("form", ["list", "dict", "dict-suffix"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_merge_and_unmerge_equal_the_reference(form, dtype):
    idx = [3, 9, 1]
    indices = {"list": idx, "dict": {"embed_tokens": idx}, "dict-suffix": {"tokens": idx}}[form]
    params, state = _case(1, idx, dtype)
    ad = pm.Adapter(_config(indices), params)
    pristine = {k: v.copy() for k, v in state.items()}
    records: dict = {}
    merged = ad.merge(state, records=records)
    want = _reference(state, params, idx)
    assert merged["embed_tokens.weight"].tobytes() == want["embed_tokens.weight"].tobytes()  # rows exact, rest W
    np.testing.assert_allclose(merged["q.weight"], want["q.weight"], rtol=0, atol=4 * np.finfo(dtype).eps * 20)
    assert merged["q.bias"] is state["q.bias"]
    assert sorted(records) == ["embed_tokens"]
    np.testing.assert_array_equal(records["embed_tokens"], state["embed_tokens.weight"][sorted(idx)])
    for k, v in pristine.items():
        assert np.array_equal(state[k], v)  # copy=True touches nothing
    back = ad.unmerge(merged, records=records)
    assert back["embed_tokens.weight"].tobytes() == state["embed_tokens.weight"].tobytes()  # exact with the record
    np.testing.assert_allclose(back["q.weight"], state["q.weight"], rtol=0, atol=8 * np.finfo(dtype).eps * 20)
    with pytest.raises(NotInvertibleError, match=r"embed_tokens: unmerging trainable tokens needs the original rows"):
        ad.unmerge(merged)


@pytest.mark.parametrize("layout", ["Fortran", "permuted", "row-sliced"])
def test_in_place_merge_writes_the_callers_table(layout):
    idx = [0, 4, 5, 16]
    params, state = _case(2, idx)
    make = {"Fortran": np.asfortranarray, "permuted": lambda w: np.ascontiguousarray(w.T).T,
            "row-sliced": lambda w: np.repeat(w, 2, axis=0)[::2]}[layout]
    table = make(state["embed_tokens.weight"])
    live = {**state, "embed_tokens.weight": table, "q.weight": state["q.weight"].copy()}
    ad = pm.Adapter(_config(idx), params)
    records: dict = {}
    out = ad.merge(live, copy=False, records=records)
    assert out["embed_tokens.weight"] is table
    np.testing.assert_array_equal(table, _reference(state, params, idx)["embed_tokens.weight"])
    ad.unmerge(live, copy=False, records=records)
    assert np.ascontiguousarray(table).tobytes() == state["embed_tokens.weight"].tobytes()
    ro = state["embed_tokens.weight"].copy()
    ro.flags.writeable = False
    with pytest.raises(UnsupportedError, match="read-only"):
        ad.merge({**state, "embed_tokens.weight": ro, "q.weight": state["q.weight"].copy()}, copy=False)


def test_forward_is_the_lookup_in_the_merged_table_and_the_lora_forward():
    idx = [3, 9, 1]
    params, state = _case(3, idx)
    ad = pm.Adapter(_config(idx), params)
    merged = _reference(state, params, idx)
    ids = np.array([[3, 0, 9], [16, 1, 1]])
    np.testing.assert_array_equal(ad.forward("embed_tokens", ids, state), merged["embed_tokens.weight"][ids])
    np.testing.assert_array_equal(ad.forward("embed_tokens", ids, state, embed_scale=2.0),
                                  merged["embed_tokens.weight"][ids] * np.float32(2.0))
    x = np.random.default_rng(3).standard_normal((4, D))
    want = x @ merged["q.weight"].astype(np.float64).T + state["q.bias"]
    np.testing.assert_allclose(ad.forward("q", x.astype(np.float32), state), want, rtol=1e-5, atol=1e-5)


def test_an_output_layer_bound_as_linear():
    """Rows of an (untied) ``lm_head``, the dict form's other use: the forward of a Linear bound as such."""
    idx = [2, 7]
    params, state = _case(4, idx, table="lm_head")
    state["lm_head.bias"] = np.random.default_rng(4).standard_normal(V).astype(np.float32)
    ad = pm.Adapter(_config({"lm_head": idx}), params, layer_kinds={"lm_head": "Linear"})
    merged = ad.merge(state)
    np.testing.assert_array_equal(merged["lm_head.weight"], _reference(state, params, idx, "lm_head")["lm_head.weight"])
    x = np.random.default_rng(5).standard_normal((3, D)).astype(np.float32)
    want = x.astype(np.float64) @ merged["lm_head.weight"].T.astype(np.float64) + state["lm_head.bias"]
    np.testing.assert_allclose(ad.forward("lm_head", x, state), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ad.forward("lm_head", x, state, peft_compat=True), want - state["lm_head.bias"],
                               rtol=1e-5, atol=1e-5)  # PEFT's unmerged layer drops the bias (specs/trainable_tokens.md)


def test_tied_state_dict_keeps_the_tie():
    """A torch state dict of a tied model (lm_head.weight is the embedding's tensor): the merged embedding is the
    output layer too, as in PEFT's merged (and unmerged) model."""
    torch = pytest.importorskip("torch")
    idx = [3, 9]
    params, state = _case(6, idx)
    emb = torch.tensor(state["embed_tokens.weight"])
    tstate = {"q.weight": torch.tensor(state["q.weight"]), "q.bias": torch.tensor(state["q.bias"]),
              "embed_tokens.weight": emb, "lm_head.weight": emb}
    ad = pm.Adapter(_config(idx), {m: {k: torch.tensor(v) for k, v in p.items()} for m, p in params.items()})
    with pytest.warns(pm.errors.PeftMathWarning, match="shares its storage"):
        merged = ad.merge(tstate)
    assert merged["lm_head.weight"] is merged["embed_tokens.weight"]
    np.testing.assert_array_equal(merged["lm_head.weight"].numpy(),
                                  _reference(state, params, idx)["embed_tokens.weight"])


def test_save_load_and_the_streamed_command(tmp_path):
    idx = {"embed_tokens": [5, 0, 11]}
    params, state = _case(7, idx["embed_tokens"])
    ad = pm.Adapter(_config(idx), params)
    pm.save_adapter(ad, tmp_path / "a")
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert saved["trainable_token_indices"] == idx
    again = pm.load_adapter(tmp_path / "a")
    assert again.modules == ["embed_tokens", "q"]
    assert again.num_trainable_parameters() == 3 * D + 2 * D * 2
    api = ad.merge(state)
    save_file(state, tmp_path / "base.safetensors", metadata={"format": "pt"})
    assert cli.main(["merge", str(tmp_path / "base.safetensors"), str(tmp_path / "a"), "-o",
                     str(tmp_path / "m.safetensors")]) == 0
    from safetensors.numpy import load_file

    merged = load_file(str(tmp_path / "m.safetensors"))
    for k in state:
        np.testing.assert_array_equal(merged[k], np.asarray(api[k]), err_msg=k)
    assert cli.main(["unmerge", str(tmp_path / "m.safetensors"), str(tmp_path / "a"), "-o",
                     str(tmp_path / "u.safetensors")]) == 0  # with the records the merge wrote beside it
    back = load_file(str(tmp_path / "u.safetensors"))
    assert back["embed_tokens.weight"].tobytes() == state["embed_tokens.weight"].tobytes()
    np.testing.assert_allclose(back["q.weight"], state["q.weight"], atol=1e-5)
    (tmp_path / "m.safetensors.merge-records.safetensors").unlink()  # without the records: refused, saying what
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = cli.main(["unmerge", str(tmp_path / "m.safetensors"), str(tmp_path / "a"), "-o",
                       str(tmp_path / "u2.safetensors")])
    assert rc == 1 and not (tmp_path / "u2.safetensors").exists()
    assert "embed_tokens: unmerging this LORA module needs what its merge recorded" in " ".join(err.getvalue().split())


# --------------------------------------------------------------------------------------------------
# refusals
# --------------------------------------------------------------------------------------------------
def _folder(tmp_path, config: dict, tensors: dict):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 6,
                                                             "target_modules": ["q"], **config}))
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    return folder


def _tensors(params):
    return {f"base_model.model.{m}.{k}": v for m, p in params.items() for k, v in p.items()}


@pytest.mark.parametrize("config, tensors, error, pattern", [
    ({}, "rows", CheckpointError, r"embed_tokens: the checkpoint holds embed_tokens.token_adapter.trainable_tokens_delta "
                                  r".*no trainable_token_indices"),
    ({"trainable_token_indices": [1, 2, 3]}, "no rows", CheckpointError,
     r"sets trainable_token_indices=\[1, 2, 3\] but the checkpoint holds no <module>.token_adapter"),
    ({"trainable_token_indices": {"lm_head": [1, 2, 3]}}, "rows", CheckpointError,
     r"no key of trainable_token_indices \(\['lm_head'\]\) is the end of this module's name"),
    ({"trainable_token_indices": [1, 2, 3]}, "two tables", CheckpointError,
     r"is a list .* rows for 2 modules \(embed_tokens, lm_head\)"),
    ({"trainable_token_indices": [1, -2]}, "rows", ConfigError, r"trainable_token_indices' must be a list of token ids"),
    ({"trainable_token_indices": {"embed_tokens": "1"}}, "rows", ConfigError, r"entry 'embed_tokens'"),
])
def test_checkpoints_the_config_does_not_account_for(tmp_path, config, tensors, error, pattern):
    params, _ = _case(8)
    if tensors == "no rows":
        del params["embed_tokens"]
    elif tensors == "two tables":
        params["lm_head"] = {KEY: params["embed_tokens"][KEY]}
    with pytest.raises(error, match=pattern):
        ad = pm.load_adapter(_folder(tmp_path, config, _tensors(params)))
        ad.module("embed_tokens", weight_shape=(V, D))


def test_a_module_with_lora_tensors_and_rows_is_refused():
    params, state = _case(9)
    params["embed_tokens"].update({"lora_embedding_A": np.zeros((2, V), np.float32),
                                   "lora_embedding_B": np.zeros((D, 2), np.float32)})
    ad = pm.Adapter(_config([3, 9, 1]), params)
    with pytest.raises(CheckpointError, match=r"embed_tokens: the checkpoint holds both LoRA tensors "
                                              r"\(lora_embedding_A, lora_embedding_B\) and trainable-token rows"):
        ad.merge(state)


def test_rows_out_of_the_table_scale_and_delta_are_refused():
    params, state = _case(10, [3, 9, 17])
    with pytest.raises(ShapeError, match=r"token index 17 \(token_indices\[2\]\) is outside the table of V = 17"):
        pm.Adapter(_config([3, 9, 17]), params).merge(state)
    params, state = _case(10)
    ad = pm.Adapter(_config([3, 9, 1]), params)
    with pytest.raises(UnsupportedError, match=r"embed_tokens: trainable-token rows .* no linear scale"):
        ad.merge(state, scale=0.5)
    with pytest.raises(UnsupportedError, match=r"replace rows of the table .* no standalone delta weight"):
        ad.delta_weight("embed_tokens", weight_shape=(V, D))
    A, B = (params["q"][k].astype(np.float64) for k in ("lora_A.weight", "lora_B.weight"))
    np.testing.assert_allclose(ad.delta_weight("q", weight_shape=(D, D)), 3.0 * B @ A, rtol=0, atol=1e-5)


def test_adalora_refuses_the_field_by_name():
    from peftmath.config import check_supported
    from peftmath.methods.adalora import AdaLoraConfig

    cfg = AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=["q"], trainable_token_indices=[1])
    with pytest.raises(UnsupportedError, match=r"trainable_token_indices=\[1\] switches on .* with AdaLoRA"):
        check_supported(cfg)


def test_rows_in_a_checkpoint_of_another_method_are_not_accounted_for(tmp_path):
    """Only LoRA adapters hold a table's rows (PEFT's other configs have no trainable_token_indices): in a LoHa
    checkpoint they are a tensor nobody owns, named as what they look like."""
    rng = np.random.default_rng(11)
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LOHA", "r": 2, "alpha": 4,
                                                             "target_modules": ["q"]}))
    tensors = {f"base_model.model.q.hada_{w}": rng.standard_normal(s).astype(np.float32)
               for w, s in (("w1_a", (D, 2)), ("w1_b", (2, D)), ("w2_a", (D, 2)), ("w2_b", (2, D)))}
    tensors[f"base_model.model.embed_tokens.{KEY}"] = np.ones((2, D), np.float32)
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"1 tensor\(s\) .*embed_tokens.token_adapter.trainable_tokens_delta' "
                                              r"\(trainable tokens \(trainable_token_indices; peftmath reads them in "
                                              r"LoRA adapters\)"):
        pm.load_adapter(folder)


def test_initial_rows_copy_the_table_and_a_new_adapter_without_rows_is_refused(tmp_path):
    """A new adapter starts as the identity (PEFT's wrapper copies W[t]), create_adapter included; an adapter
    whose config names rows it does not hold is refused instead of merged without them."""
    from peftmath.methods._lora_tokens import initial_rows

    rng = np.random.default_rng(12)
    state = {"model.embed_tokens.weight": rng.standard_normal((V, D)).astype(np.float32),
             "lm_head.weight": rng.standard_normal((V, D)).astype(np.float32),
             "model.layers.0.q.weight": rng.standard_normal((D, D)).astype(np.float32)}
    rows = initial_rows(_config([4, 2, 4]), state)
    assert list(rows) == ["model.embed_tokens"]
    np.testing.assert_array_equal(rows["model.embed_tokens"][KEY], state["model.embed_tokens.weight"][[4, 2, 4]])
    both = initial_rows(_config({"embed_tokens": [1], "lm_head": [0, 3]}), state)
    np.testing.assert_array_equal(both["lm_head"][KEY], state["lm_head.weight"][[0, 3]])
    cfg = _config({"embed_tokens": [1], "lm_head": [0, 3]})
    ad = pm.Adapter(cfg, {**both, "model.layers.0.q": {"lora_A.weight": np.zeros((2, D), np.float32),
                                                        "lora_B.weight": np.zeros((D, 2), np.float32)}})
    merged = ad.merge(state)
    for k in state:  # the identity
        assert np.asarray(merged[k]).tobytes() == state[k].tobytes(), k
    with pytest.raises(ConfigError, match=r"no module of the base ends with \['head'\]"):
        initial_rows(_config({"head": [1]}), {"lm.weight": state["lm_head.weight"]})
    with pytest.raises(ConfigError, match="the base has none among the names"):
        initial_rows(_config([1]), {"lm_head.weight": state["lm_head.weight"]})
    # create_adapter adds the rows: the identity, then (rows edited) the edited rows and LoRA's W + s·B·A
    new = pm.create_adapter(state, _config([1, 2]), model_type="llama")
    assert sorted(new.params["model.embed_tokens"]) == [KEY]
    np.testing.assert_array_equal(new.params["model.embed_tokens"][KEY], state["model.embed_tokens.weight"][[1, 2]])
    assert all(np.asarray(v).tobytes() == state[k].tobytes() for k, v in new.merge(state).items())
    new.params["model.embed_tokens"][KEY] = rng.standard_normal((2, D)).astype(np.float32)
    edited = new.merge(state)["model.embed_tokens.weight"]
    np.testing.assert_array_equal(edited[[1, 2]], new.params["model.embed_tokens"][KEY])
    np.testing.assert_array_equal(np.delete(edited, [1, 2], axis=0), np.delete(state["model.embed_tokens.weight"],
                                                                               [1, 2], axis=0))
    from peftmath.inspect import inspect_adapter

    pm.save_adapter(new, tmp_path / "new")  # inspect: the rows' module has no rank (no factors)
    ranks = {e["module"]: e.get("rank") for e in inspect_adapter(tmp_path / "new")["modules"]}
    assert ranks == {"model.embed_tokens": None, "model.layers.0.q": 2}
    lora_only = {m: p for m, p in new.params.items() if m != "model.embed_tokens"}
    with pytest.raises(CheckpointError, match=r"LORA adapter: the config sets trainable_token_indices=\[1, 2\]"):
        pm.Adapter(new.config, lora_only)
