"""`peftmath init --parameter-order / --is-transposed / --target-parameter` (LoRA's target_parameters, issue 18): the
adapter the command writes from a safetensors base (sorted keys: the registration order PEFT nests wrappers by is
lost) is the one ``create_adapter`` gives for the base in registration order; the flags' errors name the flag and
what to do. ``tests/parity/test_init_cli_parity.py`` loads the written adapters in PEFT. Also: init with
layer_replication writes the adapter of the replicated model (PEFT: test_create_lora_replication_parity.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import peftmath as pm
from peftmath.cli import main
from peftmath.io import config_from_dict
from peftmath.io.safetensors import load_file, save_file
from peftmath.methods.lora_replication import load_replicated

E, H, I = 3, 4, 5  # experts, hidden, intermediate


def experts_state(transposed: bool = False, seed: int = 0) -> dict[str, np.ndarray]:
    """A mixture-of-experts block and a Linear, in PyTorch's registration order (gate_up_proj before down_proj):
    experts (E, 2I, H) / (E, H, I), or (E, H, 2I) / (E, I, H) transposed."""
    rng = np.random.default_rng(seed)
    shapes = {"experts.gate_up_proj": (E, H, 2 * I) if transposed else (E, 2 * I, H),
              "experts.down_proj": (E, I, H) if transposed else (E, H, I), "lin.weight": (H, 2 * H),
              "lin.bias": (H,)}
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


CONFIG = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "init_lora_weights": False, "target_modules": [],
          "target_parameters": ["experts.gate_up_proj", "experts.down_proj"]}


@pytest.fixture()
def base(tmp_path):
    state = experts_state()
    path = tmp_path / "model.safetensors"
    save_file(state, path)
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(CONFIG))
    return path, cfg, state


def _written(folder):
    return load_file(folder / "adapter_model.safetensors"), json.loads((folder / "adapter_config.json").read_text())


def _expected(state, tmp_path, name, config=CONFIG, **kwargs):
    """What create_adapter writes for ``state`` (a dict in registration order) with the command's seed 0."""
    pm.save_adapter(pm.create_adapter(state, config_from_dict(config), seed=0, **kwargs), tmp_path / name)
    return _written(tmp_path / name)


def _same(got, want):
    (gt, gc), (wt, wc) = got, want
    assert sorted(gt) == sorted(wt)
    for k in wt:
        assert gt[k].shape == wt[k].shape and np.array_equal(gt[k], wt[k]), k
    for key in ("target_modules", "target_parameters", "r", "lora_alpha", "init_lora_weights"):
        assert gc.get(key) == wc.get(key), key


def test_parameter_order_gives_the_registration_order_adapter(tmp_path, base, capsys):
    path, cfg, state = base
    out = tmp_path / "out"
    # without the order the command refuses, naming the flag
    assert main(["init", str(path), "--config", str(cfg), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert "--parameter-order" in err and "registration order" in err and not out.exists()

    assert main(["init", str(path), "--config", str(cfg), "--parameter-order", "gate_up_proj,down_proj",
                 "-o", str(out), "-q"]) == 0
    got = _written(out)
    _same(got, _expected(state, tmp_path, "want"))
    # PEFT's nesting: the first registered parameter innermost (experts.base_layer), the lora factors per expert
    assert got[0]["base_model.model.experts.base_layer.lora_A.weight"].shape == (2 * E, H)
    assert got[0]["base_model.model.experts.base_layer.lora_B.weight"].shape == (2 * I, 2 * E)
    assert got[0]["base_model.model.experts.lora_A.weight"].shape == (2 * E, I)

    # the other order (repeated flag form): the other nesting, as create_adapter gives it
    assert main(["init", str(path), "--config", str(cfg), "--parameter-order", "down_proj", "--parameter-order",
                 "gate_up_proj", "-o", str(tmp_path / "other"), "-q"]) == 0
    other = _written(tmp_path / "other")
    _same(other, _expected(state, tmp_path, "want-other", parameter_order=["down_proj", "gate_up_proj"]))
    assert other[0]["base_model.model.experts.base_layer.lora_A.weight"].shape == (2 * E, I)


def test_is_transposed_reads_experts_as_in_out(tmp_path, capsys):
    state = experts_state(transposed=True)
    path = tmp_path / "model.safetensors"
    save_file(state, path)
    args = ["init", str(path), "--rank", "2", "--alpha", "4", "--init", "false", "--target-parameter",
            "experts.down_proj", "--target-parameter", "experts.gate_up_proj", "--parameter-order",
            "gate_up_proj,down_proj"]
    assert main([*args, "--is-transposed", "-o", str(tmp_path / "t"), "-q"]) == 0
    got = _written(tmp_path / "t")
    want_cfg = {**CONFIG, "target_modules": None, "target_parameters": ["experts.down_proj", "experts.gate_up_proj"]}
    _same(got, _expected(state, tmp_path, "want", want_cfg, is_transposed=True))
    assert got[0]["base_model.model.experts.base_layer.lora_A.weight"].shape == (2 * E, H)  # in = H: (E, H, 2I)
    assert got[0]["base_model.model.experts.base_layer.lora_B.weight"].shape == (2 * I, 2 * E)
    # --no-is-transposed reads the same tensors as (E, out, in): other factor shapes
    assert main([*args, "--no-is-transposed", "-o", str(tmp_path / "n"), "-q"]) == 0
    plain = _written(tmp_path / "n")
    _same(plain, _expected(state, tmp_path, "want-n", want_cfg, is_transposed=False))
    assert plain[0]["base_model.model.experts.base_layer.lora_A.weight"].shape == (2 * E, 2 * I)
    # the adapters merge back to the base's shapes
    merged = pm.load_adapter(tmp_path / "t").merge(state)
    assert all(merged[k].shape == v.shape for k, v in state.items())


@pytest.mark.parametrize("flags, needle", [
    (["--parameter-order", "gate_up_proj,gate_up_proj"], "--parameter-order names gate_up_proj more than once"),
    (["--parameter-order", "gate_up_proj,up_proj"], "--parameter-order names up_proj, which no target_parameters"),
])
def test_parameter_order_errors_name_the_flag(tmp_path, base, capsys, flags, needle):
    path, cfg, _ = base
    assert main(["init", str(path), "--config", str(cfg), *flags, "-o", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert needle in err and "the first registered" in err and not (tmp_path / "o").exists()


@pytest.mark.parametrize("flag", [["--parameter-order", "gate_up_proj"], ["--is-transposed"], ["--no-is-transposed"]])
def test_flags_without_target_parameters_are_refused(tmp_path, base, capsys, flag):
    path, _, _ = base
    assert main(["init", str(path), "--target", "lin", *flag, "-o", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert f"{flag[0]}: " in err and "targets no parameters" in err and "--target-parameter" in err
    assert not (tmp_path / "o").exists()


def test_parameter_order_names_are_checked_by_argparse(tmp_path, base, capsys):
    path, cfg, _ = base
    assert main(["init", str(path), "--config", str(cfg), "--parameter-order", "experts.gate_up_proj", "-o",
                 str(tmp_path / "o")]) == 2  # a usage error
    assert "argument --parameter-order: expected parameter names" in capsys.readouterr().err


def test_is_transposed_on_2d_parameters_warns(tmp_path, base, capsys):
    path, _, state = base
    out = tmp_path / "o"
    assert main(["init", str(path), "--target-parameter", "lin.weight", "--is-transposed", "-o", str(out)]) == 0
    assert "no targeted parameter is 3-D" in capsys.readouterr().err
    assert sorted(_written(out)[0]) == ["base_model.model.lin.lora_A.weight", "base_model.model.lin.lora_B.weight"]
    assert main(["init", str(path), "--target-parameter", "lin.weight", "--is-transposed", "--strict", "-o",
                 str(tmp_path / "s")]) == 1  # --strict: the warning is an error


def _replication_base(tmp_path) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    state = {f"model.layers.{i}.{m}.weight": rng.standard_normal((4, 6) if m == "q" else (6,)).astype(np.float32)
             for i in range(3) for m in ("q", "ln")}
    save_file(state, tmp_path / "model.safetensors")
    return state


def test_init_writes_a_layer_replication_adapter(tmp_path, capsys):
    """With layer_replication init writes the adapter of PEFT's replicated model (create_adapter's: a module on every
    new layer, the field kept), which load_replicated reads with the base; its table lists the new layers and the
    trainable line counts a weight the copies share once, as PEFT does."""
    state = _replication_base(tmp_path)
    cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q"], "layer_replication": [[0, 2], [1, 3]]}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    out = tmp_path / "o"
    assert main(["init", str(tmp_path / "model.safetensors"), "--config", str(tmp_path / "cfg.json"), "--seed", "5",
                 "-o", str(out)]) == 0
    captured = capsys.readouterr()
    assert json.loads((out / "adapter_config.json").read_text())["layer_replication"] == [[0, 2], [1, 3]]
    tensors, _ = _written(out)
    want = pm.create_adapter(state, cfg, seed=5).state_dict()
    assert sorted(tensors) == sorted(want) == sorted(f"base_model.model.model.layers.{j}.q.lora_{f}.weight"
                                                     for j in range(4) for f in "AB")
    for k, v in want.items():
        assert np.array_equal(tensors[k], v), k
    assert all(f"model.layers.{j}.q" in captured.out for j in range(4))
    # 4 modules of r=2 on (4, 6): 4 * 2 * (6 + 4) = 80 trainable; the replicated model holds base layers 0, 1, 2
    # (layer 1 twice, one shared array): 3 * (24 + 6) = 90 base parameters
    assert "trainable params: 80 || all params: 170 ||" in captured.err
    ad, replicated, _ = load_replicated(out, state)
    assert ad.modules == [f"model.layers.{j}.q" for j in range(4)] and len(replicated) == 8


def test_init_refuses_a_layer_map_that_does_not_fit(tmp_path, capsys):
    _replication_base(tmp_path)
    (tmp_path / "cfg.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "target_modules": ["q"],
                                                   "layer_replication": [[0, 2], [1, 4]]}))
    assert main(["init", str(tmp_path / "model.safetensors"), "--config", str(tmp_path / "cfg.json"), "-o",
                 str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "layer_replication: range [1, 4]" in err and "the base has 3 layers" in err and not (tmp_path / "o").exists()
