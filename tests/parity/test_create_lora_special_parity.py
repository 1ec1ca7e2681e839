"""``create_adapter`` for LoRA's special targets against real PEFT 0.21.2 (issue 18): ``target_parameters``
(``lora.ParamWrapper``: 3-D experts ``(E, 2I, H)`` / ``(E, H, I)``, nested on one module, and 2-D parameters)
and ``nn.MultiheadAttention`` targets (``lora.MultiheadAttention``).

For a tiny torch model holding those parameters:

* the adapter peftmath creates saves exactly the checkpoint keys and shapes, and the config fields, that PEFT's
  ``get_peft_model`` + ``save_pretrained`` write for the same config;
* peftmath's save (``init_lora_weights=False``, so that the adapter changes the model) loads with
  ``PeftModel.from_pretrained`` without missing or unexpected keys, and PEFT's ``merge_and_unload`` equals
  peftmath's merge (float32 round-off: ``1e-5·(1 + |w|)``);
* the default init merges to the base bit for bit, in peftmath and in PEFT;
* the init distributions are PEFT's: the same bounds (kaiming-uniform ``1/√fan_in``) and the same gaussian
  standard deviation (``1/r``, r per expert), checked on both libraries' draws.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from tests.parity.conftest import load_in_peft, n2t, require_peft, t2n

torch, peft = require_peft()

import peftmath as pm  # noqa: E402
from peftmath.io import config_from_dict  # noqa: E402

pytestmark = [pytest.mark.parity]

E, H, I, D = 3, 4, 5, 6  # experts, hidden, intermediate, attention embedding


def _experts_class(transposed: bool, E: int, H: int, I: int):
    nn = torch.nn

    class Experts(nn.Module):
        """Expert weights stored (E, out, in) as transformers' Llama 4 / Mixtral experts (is_transposed: (E, in, out))."""

        is_transposed = transposed

        def __init__(self):
            super().__init__()
            shapes = ((E, H, 2 * I), (E, I, H)) if transposed else ((E, 2 * I, H), (E, H, I))
            self.gate_up_proj = nn.Parameter(torch.zeros(shapes[0]))  # registered first: the innermost wrapper
            self.down_proj = nn.Parameter(torch.zeros(shapes[1]))

    return Experts


class Net(torch.nn.Module):
    def __init__(self, transposed: bool = False, sizes: tuple[int, int, int, int] = (E, H, I, D)):
        super().__init__()
        E, H, I, D = sizes
        self.experts = _experts_class(transposed, E, H, I)()
        self.attn = torch.nn.MultiheadAttention(D, 2)
        self.blocks = torch.nn.ModuleList([torch.nn.Module()])
        self.blocks[0].attn = torch.nn.MultiheadAttention(D, 3, bias=False)
        self.lin = torch.nn.Linear(D, H)


CASES = {
    "experts, one parameter": dict(target_modules=[], target_parameters=["experts.gate_up_proj"]),
    "experts nested, patterns": dict(target_parameters=["experts.down_proj", "gate_up_proj"], r=2, lora_alpha=3,
                                     rank_pattern={"experts.down_proj": 3}, alpha_pattern={"gate_up_proj": 5}),
    "attentions": dict(target_modules=["attn"], r=3, lora_alpha=6, rank_pattern={"blocks.0.attn": 2}),
    "attentions, experts and a Linear": dict(target_modules=["attn", "lin"], target_parameters=["experts.down_proj"],
                                             use_rslora=True),
    "2-D parameters": dict(target_modules=[], target_parameters=["lin.weight", "attn.in_proj_weight"]),
    "transposed experts": dict(target_parameters=["gate_up_proj", "down_proj"], r=2),
    # all-linear: the attentions' out_proj (an nn.Linear) as plain LoRA, never the attention itself
    "all-linear": dict(target_modules="all-linear"),
}


def _build(case: str, seed: int = 0) -> torch.nn.Module:
    model = Net(transposed=case == "transposed experts")
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(n2t(rng.standard_normal(tuple(p.shape)).astype(np.float32)))
    return model.eval()


def _state(model) -> dict[str, np.ndarray]:
    return {k: t2n(v) for k, v in model.state_dict().items()}  # torch's order: the registration order


def _config(case: str, **extra) -> dict:
    return {"r": 2, "lora_alpha": 4, **CASES[case], **extra}


def _ours(case: str, state, **extra):
    cfg = config_from_dict({"peft_type": "LORA", **_config(case, **extra)})
    return pm.create_adapter(state, cfg, seed=3, is_transposed=True if case == "transposed experts" else None)


def _peft(case: str, **extra):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(_build(case), peft.LoraConfig(**_config(case, **extra)))


def _saved(folder) -> tuple[dict[str, tuple[int, ...]], dict]:
    from safetensors.numpy import load_file

    tensors = load_file(str(folder / "adapter_model.safetensors"))
    cfg = json.loads((folder / "adapter_config.json").read_text())
    return {k: tuple(v.shape) for k, v in tensors.items()}, cfg


def _merged_by_peft(case: str, folder) -> dict[str, np.ndarray]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_in_peft(_build(case), str(folder))
    return {k: t2n(v) for k, v in model.merge_and_unload().state_dict().items()}


def _close(got, want, what):
    g, w = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert g.shape == w.shape, what
    err = np.abs(g - w)
    assert np.all(err <= 1e-5 * (1 + np.abs(w))), (what, float(err.max()))


@pytest.mark.parametrize("case", list(CASES))
def test_created_adapter_has_peft_keys_shapes_and_config(case, tmp_path):
    pmodel = _peft(case)
    pmodel.save_pretrained(tmp_path / "peft")
    want, want_cfg = _saved(tmp_path / "peft")
    ours = _ours(case, _state(_build(case)))
    pm.save_adapter(ours, tmp_path / "ours")
    got, got_cfg = _saved(tmp_path / "ours")
    assert got == want
    for key in ("target_modules", "target_parameters", "r", "lora_alpha", "rank_pattern", "alpha_pattern",
                "use_rslora", "init_lora_weights"):
        g, w = got_cfg.get(key), want_cfg.get(key)
        if isinstance(w, list) and isinstance(g, list):
            g, w = sorted(g), sorted(w)
        assert g == w, (key, g, w)


@pytest.mark.parametrize("case", list(CASES))
def test_peft_loads_the_created_adapter_and_merges_as_peftmath(case, tmp_path):
    base = _build(case)
    state = _state(base)
    ours = _ours(case, state, init_lora_weights=False)
    pm.save_adapter(ours, tmp_path)
    want = _merged_by_peft(case, tmp_path)
    got = {k: np.asarray(v) for k, v in ours.merge(state).items()}
    assert sorted(got) == sorted(want)
    changed = [k for k in state if not np.array_equal(want[k], state[k])]
    assert changed, "init_lora_weights=False must change the model"
    for k in want:
        _close(got[k], want[k], k)


@pytest.mark.parametrize("case", list(CASES))
def test_default_init_is_a_no_op_in_peftmath_and_peft(case, tmp_path):
    state = _state(_build(case))
    ours = _ours(case, state)
    merged = ours.merge(state)
    for k, w in state.items():
        assert np.array_equal(np.asarray(merged[k]), w), k
    pm.save_adapter(ours, tmp_path)
    for k, w in _merged_by_peft(case, tmp_path).items():
        assert np.array_equal(w, state[k]), k


def _factors_by_peft(pmodel) -> dict[str, np.ndarray]:
    return {k.removeprefix("base_model.model.").replace(".default", ""): t2n(v)
            for k, v in pmodel.state_dict().items() if "lora_" in k}


@pytest.mark.parametrize("init", [False, "gaussian"])
def test_init_distributions_are_peft(init):
    """Both libraries' draws on bigger experts / attentions: within the same kaiming-uniform bounds and filling them
    (False), or with the same gaussian std 1/r (r per expert, not r·E); B = 0 for gaussian."""
    sizes = (4, 64, 48, 48)
    kw = dict(target_modules=["attn"], target_parameters=["experts.gate_up_proj", "experts.down_proj"], r=8,
              init_lora_weights=init)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = _factors_by_peft(peft.get_peft_model(Net(sizes=sizes), peft.LoraConfig(**kw)))
    ours = pm.create_adapter(_state(Net(sizes=sizes)), config_from_dict({"peft_type": "LORA", **kw}), seed=0)
    got = {f"{m}.{k}": np.asarray(v) for m, p in ours.params.items() for k, v in p.items()}
    assert sorted(got) == sorted(theirs)
    for key, t in theirs.items():
        g = got[key]
        assert g.shape == t.shape and g.dtype == t.dtype, key
        if init is False:
            bound = 1 / np.sqrt(t.shape[1])  # nn.Linear's kaiming-uniform(a=√5): U(±1/√fan_in)
            for arr, who in ((g, "peftmath"), (t, "peft")):
                assert np.abs(arr).max() <= bound and np.abs(arr).max() > 0.95 * bound, (key, who)
                assert abs(arr.std() - bound / np.sqrt(3)) < 0.1 * bound / np.sqrt(3), (key, who)
        elif key.endswith("lora_B.weight"):
            assert not g.any() and not t.any(), key
        else:
            for arr, who in ((g, "peftmath"), (t, "peft")):
                assert abs(arr.std() - 1 / 8) < 0.1 / 8, (key, who, arr.std())
