"""Format conversion against the tools that own the formats.

* kohya / LyCORIS: the ``lycoris-lora`` package loads what peftmath writes (``create_lycoris_from_weights``)
  and its modules' forward equals PEFT's delta; what LyCORIS writes (``create_lycoris`` + ``save_weights``)
  peftmath reads back to the same delta.
* MLX: ``mlx-lm``'s own ``load_adapters`` loads what peftmath writes (LoRA, Embedding LoRA, DoRA), and
  peftmath reads what mlx-lm's layers hold.
* PEFT: an adapter PEFT saved goes PEFT -> kohya -> PEFT and PEFT loads the result to the same outputs.

Each reference is skipped when its package is absent. Everything is float64 on the reference side, so
the tolerances are a few float64 ulps of the output's magnitude.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from tests.parity.conftest import require_peft

torch, peft = require_peft()

from peftmath import formats as C  # noqa: E402
from peftmath.create import create_adapter  # noqa: E402
from peftmath.io import load_adapter  # noqa: E402
from peftmath.methods.loha import LoHaConfig  # noqa: E402
from peftmath.methods.lokr import LoKrConfig  # noqa: E402
from peftmath.methods.lora import LoraConfig  # noqa: E402

EPS64 = np.finfo(np.float64).eps


def _convert(ad, to, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", C.ConversionWarning)
        return C.convert(ad, to, **kw)


def _close(y, ref, ulps=64):
    y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
    err = np.max(np.abs(y - ref))
    assert err <= ulps * EPS64 * max(1.0, np.max(np.abs(ref))), err


# --------------------------------------------------------------------------------------------------
# kohya / LyCORIS
# --------------------------------------------------------------------------------------------------
def _torch_block():
    class Blk(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 12, bias=False)
            self.conv = torch.nn.Conv2d(4, 6, 3, bias=False)
            self.c1 = torch.nn.Conv1d(16, 16, 3, bias=False)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blk = Blk()

    return Net().double()


def _lyco_delta_out(lora, x):
    org = lora.org_module[0] if isinstance(lora.org_module, list) else lora.org_module
    lora.double()
    w = org.weight.double()   # the base output from the weight: after apply_to, org's forward is LyCORIS'
    with torch.no_grad():
        base = _apply(x, w)
        return (lora(x) - base).numpy()


def _apply(x, w):
    F = torch.nn.functional
    return {2: lambda: x @ w.T, 3: lambda: F.conv1d(x, w), 4: lambda: F.conv2d(x, w)}[w.ndim]()


def _our_out(delta, x):
    with torch.no_grad():
        return _apply(x, torch.tensor(np.asarray(delta, np.float64))).numpy()


SHAPES = {"blk.lin": (12, 8), "blk.conv": (6, 4, 3, 3), "blk.c1": (16, 16, 3)}
INPUTS = {"blk.lin": (3, 8), "blk.conv": (2, 4, 5, 5), "blk.c1": (2, 16, 7)}


ALL = ["lin", "conv", "c1"]
LYCORIS_CASES = [
    LoraConfig(r=2, lora_alpha=5, target_modules=ALL),
    LoraConfig(r=3, lora_alpha=5, target_modules=ALL, use_rslora=True),
    LoHaConfig(r=2, alpha=5, target_modules=ALL),
    LoHaConfig(r=2, alpha=3, target_modules=ALL, use_effective_conv2d=True),
    # a Conv1d LoKr with a full w2 is refused (PEFT and LyCORIS lay it out differently)
    LoKrConfig(r=2, alpha=5, target_modules=["lin", "conv"]),
    # LyCORIS 4.1.3 cannot load a tucker LoKr whose w1 is full (it reads the rank from lokr_w2_a's
    # columns, which are b there); with decompose_both the 16x16 Conv1d's w1 is factored
    LoKrConfig(r=1, alpha=5, target_modules=["lin", "c1"], decompose_both=True, use_effective_conv2d=True),
]


@pytest.mark.parametrize("config", LYCORIS_CASES, ids=lambda c: f"{c.peft_type}")
def test_lycoris_loads_what_we_write(config, tmp_path):
    lycoris = pytest.importorskip("lycoris")
    rng = np.random.default_rng(0)
    base = {m + ".weight": rng.standard_normal(s) for m, s in SHAPES.items()}
    ad = create_adapter(base, config, init=False)
    for p in ad.params.values():
        assert all(a.dtype == np.float32 for a in p.values())
    out = _convert(ad, "kohya")   # float32 tensors, as LyCORIS' loader holds them
    # the reference: the same float32 values, computed in float64
    ad.params = {m: {s: np.asarray(a, np.float64) for s, a in p.items()} for m, p in ad.params.items()}
    out.save(tmp_path / "k.safetensors")
    net, _ = lycoris.create_lycoris_from_weights(1.0, str(tmp_path / "k.safetensors"), _torch_block())
    names = json.loads(out.metadata[C.META_KEY])["modules"]
    assert sorted(names) == sorted(lora.lora_name for lora in net.loras)
    for lora in net.loras:
        m = names[lora.lora_name]
        x = torch.tensor(rng.standard_normal(INPUTS[m]))
        ref = _our_out(ad.delta_weight(m, weight_shape=SHAPES[m]), x)
        if {"lokr_w1", "lokr_w2"} <= set(ad.params[m]) and config.alpha != config.r:
            # both LoKr factors full: LyCORIS applies no alpha, so PEFT's scale was folded into the float32 w1
            err = np.max(np.abs(_lyco_delta_out(lora, x) - ref))
            assert err <= 8 * np.finfo(np.float32).eps * np.max(np.abs(ref)), err
        else:
            _close(_lyco_delta_out(lora, x), ref)


@pytest.mark.parametrize("algo,kw", [("lora", {}), ("loha", {}), ("lokr", {"factor": 2}),
                                     ("lokr", {"factor": 2, "decompose_both": True})])
def test_we_read_what_lycoris_writes(algo, kw, tmp_path):
    lycoris = pytest.importorskip("lycoris")
    torch.manual_seed(0)
    model = _torch_block()
    net = lycoris.create_lycoris(model, 1.0, linear_dim=2, linear_alpha=3, algo=algo, **kw)
    net.apply_to()
    rng = np.random.default_rng(1)
    with torch.no_grad():   # LyCORIS zero-initialises one factor: give every tensor values
        for name, p in net.named_parameters():
            p.copy_(torch.tensor(rng.standard_normal(tuple(p.shape)) * 0.5))
    net.save_weights(str(tmp_path / "ly.safetensors"), torch.float64, None)
    assert C.detect_format(tmp_path / "ly.safetensors") == "kohya"
    modules = [n for n, _ in model.named_modules()]
    ad = C.read_any(tmp_path / "ly.safetensors", modules=modules)
    assert ad.peft_type == {"lora": "LORA", "loha": "LOHA", "lokr": "LOKR"}[algo]
    assert sorted(ad.modules) == sorted(m for m in SHAPES if m in {n for n, _ in model.named_modules()}
                                         and C.kohya_name(m) in {lo.lora_name for lo in net.loras})
    for lora in net.loras:
        m = next(k for k in SHAPES if C.kohya_name(k) == lora.lora_name)
        x = torch.tensor(rng.standard_normal(INPUTS[m]))
        ours = _our_out(ad.delta_weight(m, weight_shape=SHAPES[m], kind=ad.layer_kinds.get(m)), x)
        _close(ours, _lyco_delta_out(lora, x))


# --------------------------------------------------------------------------------------------------
# MLX
# --------------------------------------------------------------------------------------------------
def _mlx_model(L, base):
    mx = pytest.importorskip("mlx.core")
    nn = pytest.importorskip("mlx.nn")

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = nn.Linear(8, 12, bias=False)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.self_attn = Attn()

    class Inner(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = [Block() for _ in range(L)]
            self.embed_tokens = nn.Embedding(10, 8)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = Inner()

        @property
        def layers(self):
            return self.model.layers

    model = Model()
    model.load_weights([(k, mx.array(v)) for k, v in base.items()], strict=False)
    return model


def _get(model, name):
    mod = model
    for part in name.split("."):
        mod = mod[int(part)] if part.isdigit() else getattr(mod, part)
    return mod


def _mlx_base(rng, L=2):
    base = {f"model.layers.{i}.self_attn.q_proj.weight": rng.standard_normal((12, 8)).astype(np.float32)
            for i in range(L)}
    base["model.embed_tokens.weight"] = rng.standard_normal((10, 8)).astype(np.float32)
    return base


@pytest.mark.parametrize("dora", [False, True])
def test_mlx_lm_loads_what_we_write(dora, tmp_path):
    pytest.importorskip("mlx.core")
    utils = pytest.importorskip("mlx_lm.tuner.utils")
    import mlx.core as mx

    rng = np.random.default_rng(2)
    base = _mlx_base(rng)
    targets = ["q_proj"] + ([] if dora else ["embed_tokens"])
    ad = create_adapter(base, LoraConfig(r=2, lora_alpha=5, use_rslora=not dora, use_dora=dora,
                                         target_modules=targets), init=False,
                        layer_kinds={"model.embed_tokens": "Embedding"})
    _convert(ad, "mlx").save(tmp_path / "mlx")
    model = _mlx_model(2, base)
    utils.load_adapters(model, str(tmp_path / "mlx"))   # mlx-lm's own loader checks names and shapes
    for m in ad.modules:
        W = base[m + ".weight"]
        mod = _get(model, m)
        if m == "model.embed_tokens":
            idx = np.arange(10)
            y = np.array(mod(mx.array(idx))) - W[idx]
            ref = np.asarray(ad.delta_weight(m, weight_shape=W.shape, kind="Embedding"))[idx]
        else:
            x = rng.standard_normal((3, 8)).astype(np.float32)
            y = np.array(mod(mx.array(x)))
            ref = np.asarray(ad.forward(m, x, base))
        # mlx computes in float32: a few float32 roundings of the output's size
        assert np.max(np.abs(y - ref)) <= 16 * np.finfo(np.float32).eps * np.max(np.abs(ref)), m


def test_we_read_what_mlx_lm_holds(tmp_path):
    pytest.importorskip("mlx.core")
    utils = pytest.importorskip("mlx_lm.tuner.utils")
    import mlx.core as mx
    from mlx.utils import tree_flatten

    rng = np.random.default_rng(3)
    base = _mlx_base(rng)
    model = _mlx_model(2, base)
    cfg = {"fine_tune_type": "lora", "num_layers": 2,
           "lora_parameters": {"rank": 3, "scale": 0.7, "dropout": 0.0, "keys": ["self_attn.q_proj"]}}
    model.freeze()   # as mlx-lm's trainer does: only the LoRA factors stay trainable
    utils.linear_to_lora_layers(model, cfg["num_layers"], cfg["lora_parameters"])
    weights = {}
    for k, v in tree_flatten(model.trainable_parameters()):
        weights[k] = mx.array(rng.standard_normal(v.shape).astype(np.float32))
    model.load_weights(list(weights.items()), strict=False)
    (tmp_path / "mlx").mkdir()
    mx.save_safetensors(str(tmp_path / "mlx" / "adapters.safetensors"), weights)
    (tmp_path / "mlx" / "adapter_config.json").write_text(json.dumps(cfg))
    assert C.detect_format(tmp_path / "mlx") == "mlx"
    C.convert_path(tmp_path / "mlx", tmp_path / "peft", "peft")
    ad = load_adapter(tmp_path / "peft")
    assert ad.config.lora_alpha == pytest.approx(2.1) and ad.config.r == 3
    for m in ad.modules:
        x = rng.standard_normal((3, 8)).astype(np.float32)
        y = np.array(_get(model, m)(mx.array(x)))
        ref = np.asarray(ad.forward(m, x, base))
        assert np.max(np.abs(y - ref)) <= 16 * np.finfo(np.float32).eps * np.max(np.abs(ref)), m


# --------------------------------------------------------------------------------------------------
# PEFT itself: PEFT -> kohya -> PEFT, loaded by PEFT
# --------------------------------------------------------------------------------------------------
def test_peft_saved_adapter_survives_kohya_and_back(tmp_path):
    from peft import LoraConfig as PeftLoraConfig, PeftModel, get_peft_model

    torch.manual_seed(0)
    model = _torch_block()
    pm = get_peft_model(model, PeftLoraConfig(r=3, lora_alpha=7, use_rslora=True, target_modules=["lin", "conv"],
                                              init_lora_weights=False))
    pm.save_pretrained(tmp_path / "peft")
    C.convert_path(tmp_path / "peft", tmp_path / "k.safetensors", "kohya", prefix="lora_unet")
    C.convert_path(tmp_path / "k.safetensors", tmp_path / "back", "peft")
    x_lin = torch.randn(3, 8, dtype=torch.float64)
    x_conv = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        want = (pm.base_model.model.blk.lin(x_lin), pm.base_model.model.blk.conv(x_conv))
        fresh = _torch_block()
        fresh.load_state_dict({k.replace("base_layer.", ""): v for k, v in pm.base_model.model.state_dict().items()
                               if "lora_" not in k})
        back = PeftModel.from_pretrained(fresh, tmp_path / "back")
        got = (back.base_model.model.blk.lin(x_lin), back.base_model.model.blk.conv(x_conv))
    for w, g in zip(want, got):
        _close(g.numpy(), w.numpy())


# --------------------------------------------------------------------------------------------------
# kohya / LyCORIS DoRA (dora_scale) against LyCORIS' own merge and PEFT's
# --------------------------------------------------------------------------------------------------
def _lycoris_dora(lycoris, tmp_path, wd_on_output):
    torch.manual_seed(0)
    model = _torch_block()
    net = lycoris.create_lycoris(model, 1.0, linear_dim=2, linear_alpha=3, algo="lora", dora_wd=True,
                                 wd_on_output=wd_on_output)
    net.apply_to()
    rng = np.random.default_rng(5)
    with torch.no_grad():   # every factor non-zero, the magnitude away from ‖W‖
        for name, p in net.named_parameters():
            v = rng.standard_normal(tuple(p.shape)) * 0.5
            p.copy_(torch.tensor(np.abs(v) + 0.5 if name.endswith("dora_scale") else v))
    net.save_weights(str(tmp_path / "ly.safetensors"), torch.float64, None)
    base = {m + ".weight": model.get_submodule(m).weight.detach().double().numpy().copy() for m in SHAPES}
    merged = {}
    for lora in net.loras:
        m = next(k for k in SHAPES if C.kohya_name(k) == lora.lora_name)
        lora.double()
        with torch.no_grad():
            merged[m] = lora.get_merged_weight(1.0, SHAPES[m], None)[0].numpy()
    return model, base, merged


def test_lycoris_dora_merges_as_lycoris_does(tmp_path):
    lycoris = pytest.importorskip("lycoris")
    from peftmath.cli import main
    from peftmath.io.safetensors import SafeTensorsFile, save_file

    model, base, want = _lycoris_dora(lycoris, tmp_path, True)
    modules = [n for n, _ in model.named_modules()]
    ad = C.read_any(tmp_path / "ly.safetensors", modules=modules)
    assert ad.config.use_dora and sorted(ad.modules) == sorted(SHAPES)
    kinds = {m: {2: "Linear", 3: "Conv1d", 4: "Conv2d"}[len(s)] for m, s in SHAPES.items()}
    got = ad.merge(base, layer_kinds=kinds)
    for m in SHAPES:   # LyCORIS adds finfo(float64).eps to the norm: a relative 1e-16
        assert np.max(np.abs(want[m] - base[m + ".weight"])) > 0.1
        _close(got[m + ".weight"], want[m])
    # the command merges the LyCORIS file directly (no convert step)
    save_file(base, tmp_path / "base.safetensors")
    rc = main(["merge", str(tmp_path / "base.safetensors"), str(tmp_path / "ly.safetensors"),
               "-o", str(tmp_path / "m.safetensors"), "-q"])
    assert rc == 0
    f = SafeTensorsFile(tmp_path / "m.safetensors")
    for m in SHAPES:
        _close(f[m + ".weight"], want[m])
    # and back to PEFT: PEFT itself loads the converted adapter and merges to LyCORIS' weights
    C.convert_path(tmp_path / "ly.safetensors", tmp_path / "peft", "peft", read_options={"modules": modules})
    from peft import PeftModel

    fresh = _torch_block()
    fresh.load_state_dict({k: torch.tensor(v) for k, v in base.items()})
    pm = PeftModel.from_pretrained(fresh, tmp_path / "peft").double()
    sd = pm.merge_and_unload().state_dict()
    for m in ("blk.lin", "blk.conv"):   # PEFT 0.21 has DoRA for Linear and Conv2d
        _close(sd[m + ".weight"].numpy(), want[m])


def test_lycoris_dora_on_input_columns_is_refused(tmp_path, capsys):
    lycoris = pytest.importorskip("lycoris")
    from peftmath.cli import main
    from peftmath.errors import UnsupportedError
    from peftmath.io.safetensors import save_file

    model, base, _ = _lycoris_dora(lycoris, tmp_path, False)
    with pytest.raises(UnsupportedError, match="input columns"):
        C.read_any(tmp_path / "ly.safetensors", modules=[n for n, _ in model.named_modules()])
    save_file(base, tmp_path / "base.safetensors")
    rc = main(["merge", str(tmp_path / "base.safetensors"), str(tmp_path / "ly.safetensors"),
               "-o", str(tmp_path / "m.safetensors")])
    assert rc == 1 and "wd_on_output" in capsys.readouterr().err
    assert not (tmp_path / "m.safetensors").exists()


def test_peft_dora_loaded_by_lycoris_merges_as_peft(tmp_path):
    lycoris = pytest.importorskip("lycoris")
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    torch.manual_seed(0)
    pm = get_peft_model(_torch_block(), PeftLoraConfig(r=2, lora_alpha=5, use_dora=True, target_modules=["lin", "conv"],
                                                       init_lora_weights=False)).double()
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_magnitude_vector" in n:   # float32 values: LyCORIS' loader holds dora_scale in float32
                p.copy_((p * 1.5).float().double())
    pm.save_pretrained(tmp_path / "peft")
    C.convert_path(tmp_path / "peft", tmp_path / "k.safetensors", "kohya")
    fresh = _torch_block()
    fresh.load_state_dict({k.replace("base_layer.", ""): v for k, v in pm.base_model.model.state_dict().items()
                           if "lora_" not in k})
    net, _ = lycoris.create_lycoris_from_weights(1.0, str(tmp_path / "k.safetensors"), fresh)
    with torch.no_grad():
        want = {k: v.clone() for k, v in pm.merge_and_unload().state_dict().items()}
    assert len(net.loras) == 2
    for lora in net.loras:
        m = next(k for k in SHAPES if C.kohya_name(k) == lora.lora_name)
        lora.double()
        with torch.no_grad():
            got = lora.get_merged_weight(1.0, SHAPES[m], None)[0].numpy()
        assert np.max(np.abs(got - fresh.get_submodule(m).weight.detach().numpy())) > 1e-3
        _close(got, want[m + ".weight"].numpy())
