"""A new ``layer_replication`` adapter (``peftmath.create_adapter`` and ``peftmath init``, issue 18) against PEFT
0.21.2 on a tiny Llama (``LlamaConfig``, no download): ``PeftModel.from_pretrained`` replicates the base's layers
and loads the folder with no missing or unexpected key, every tensor as peftmath wrote it; PEFT's (unmerged) model
is peftmath's merge of the replicated state loaded into a Llama of the new depth; and PEFT's own
``merge_and_unload``, which adds every copy's ΔW into the one weight the copies share, equals
``W_i + Σ_copies (merged_j − W_i)`` computed from peftmath's merge (specs/lora.md, section 12). Also PEFT's quirk:
a second adapter loaded with ``layer_replication`` replicates the replicated layers again."""

from __future__ import annotations

import io
import json
import warnings
from contextlib import redirect_stderr, redirect_stdout

import numpy as np
import pytest

from tests.parity.conftest import n2t, require_peft, t2n

torch, peft = require_peft()
transformers = pytest.importorskip("transformers")

import peftmath as pm  # noqa: E402
from peftmath.cli import main  # noqa: E402
from peftmath.io.safetensors import load_file, save_file  # noqa: E402
from peftmath.methods.lora_replication import load_replicated, replicated_order, replicated_view  # noqa: E402

pytestmark = [pytest.mark.parity]

IDS = torch.tensor([[1, 5, 9, 2, 30, 7]])
TARGETS = ["q_proj", "down_proj"]


def _llama(layers: int):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.LlamaForCausalLM(cfg).eval()


def _base_state() -> dict[str, np.ndarray]:
    return {k: t2n(v) for k, v in _llama(3).state_dict().items()}


def _load(folder):
    """PEFT's model of ``folder`` on a fresh 3-layer Llama: no warning about missing / unexpected keys."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pmodel = peft.PeftModel.from_pretrained(_llama(3), str(folder)).eval()
    msgs = [str(w.message) for w in caught]
    assert not [m for m in msgs if any(s in m.lower() for s in ("missing", "unexpected", "not present"))], msgs
    return pmodel


def _logits(model) -> np.ndarray:
    with torch.no_grad():
        return t2n(model(input_ids=IDS).logits)


def _check_against_peft(folder, state, ad, layer_map):
    """The checks of the module docstring for the adapter ``ad`` saved in ``folder`` (created on ``state``)."""
    pmodel = _load(folder)
    n = len(replicated_order(layer_map, 3))
    assert len(pmodel.base_model.model.model.layers) == n
    # the modules PEFT adds to its replicated model are the adapter's, and it holds peftmath's tensors bit for bit
    assert ad.modules == sorted(m for m, mod in pmodel.base_model.model.named_modules()
                                if isinstance(mod, peft.tuners.lora.LoraLayer))
    theirs = {k: t2n(v) for k, v in peft.get_peft_model_state_dict(pmodel).items()}
    written = load_file(folder / "adapter_model.safetensors")
    assert sorted(theirs) == sorted(written)
    for k, v in written.items():
        assert np.array_equal(theirs[k], v), k
    # PEFT's model as it runs is peftmath's merge of the replicated state
    plain, replicated = replicated_view(ad, state)
    merged = {k: np.asarray(v) for k, v in plain.merge(replicated).items()}
    deeper = _llama(n)
    deeper.load_state_dict({k: n2t(v) for k, v in merged.items()})
    np.testing.assert_allclose(_logits(deeper), _logits(pmodel), rtol=1e-5, atol=1e-5)
    # PEFT's own merge: every copy's ΔW added into the weight the copies of base layer i share
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_merged = {k: t2n(v) for k, v in pmodel.merge_and_unload().state_dict().items()}
    assert sorted(peft_merged) == sorted(merged)
    order = replicated_order(layer_map, 3)
    changed = 0
    for key, w in replicated.items():
        if not key.startswith("model.layers."):
            assert np.array_equal(peft_merged[key], w), key
            continue
        j, rest = key[len("model.layers."):].split(".", 1)
        copies = [c for c, i in enumerate(order) if i == order[int(j)]]
        want = w.astype(np.float64) + sum(merged[f"model.layers.{c}.{rest}"].astype(np.float64) - w for c in copies)
        np.testing.assert_allclose(peft_merged[key], want, rtol=1e-5, atol=1e-5, err_msg=key)
        changed += len(copies) > 1 and not np.array_equal(peft_merged[key], merged[key])
    return changed


@pytest.mark.parametrize("peft_type, layer_map", [
    ("LORA", [[0, 2], [1, 3]]),
    ("LORA", [[2, 3], [0, 2]]),
    ("LORA", [[0, 3], [0, 3]]),
    ("ADALORA", [[0, 2], [1, 3]]),
])
def test_created_adapter_loads_on_peft_s_replicated_model(peft_type, layer_map, tmp_path):
    state = _base_state()
    cfg = {"peft_type": peft_type, "r": 4, "lora_alpha": 8, "init_lora_weights": False, "target_modules": TARGETS,
           "layer_replication": layer_map, **({"total_step": 10} if peft_type == "ADALORA" else {})}
    ad = pm.create_adapter(state, cfg, seed=11)
    pm.save_adapter(ad, tmp_path / "a")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["layer_replication"] == layer_map
    changed = _check_against_peft(tmp_path / "a", state, ad, layer_map)
    # where a base layer has two copies, PEFT's merged weight is not the model it runs (peftmath's merge)
    order = replicated_order(layer_map, 3)
    assert changed == 2 * len(TARGETS) * (len(order) - len(set(order)))


def test_init_writes_an_adapter_peft_loads(tmp_path):
    """``peftmath init`` on a safetensors Llama folder: the folder loads in PEFT as above, its trainable line is
    PEFT's count, and peftmath's own reader (load_replicated with the base) merges it into the model PEFT runs."""
    layer_map = [[0, 2], [1, 3]]
    base = _llama(3)
    state = {k: t2n(v) for k, v in base.state_dict().items()}
    model = tmp_path / "model"
    model.mkdir()
    save_file(state, model / "model.safetensors", metadata={"format": "pt"})
    base.config.to_json_file(model / "config.json")
    (tmp_path / "cfg.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                   "init_lora_weights": "gaussian", "target_modules": TARGETS,
                                                   "layer_replication": layer_map}))
    out = tmp_path / "adapter"
    err = io.StringIO()
    with redirect_stderr(err), redirect_stdout(io.StringIO()):
        assert main(["init", str(model), "--config", str(tmp_path / "cfg.json"), "--seed", "3", "-o", str(out)]) == 0
    ad = pm.create_adapter(state, tmp_path / "cfg.json", seed=3, model_type="llama")
    written = load_file(out / "adapter_model.safetensors")
    assert sorted(written) == sorted(ad.state_dict())
    for k, v in ad.state_dict().items():
        assert np.array_equal(written[k], v), k
    # a fresh gaussian LoRA is a no-op (B = 0): train it a little for the forward to test something
    rng = np.random.default_rng(4)
    trained = {k: (v + rng.normal(0, 0.2, v.shape)).astype(np.float32) for k, v in written.items()}
    save_file(trained, out / "adapter_model.safetensors")
    pmodel = _load(out)
    _, total = pmodel.get_nb_trainable_parameters()  # a weight the copies share is counted once
    trainable = sum(p.numel() for n, p in pmodel.named_parameters() if "lora_" in n)  # (loaded frozen: 0 trainable)
    assert f"trainable params: {trainable:,} || all params: {total:,} ||" in err.getvalue()
    loaded, replicated, cfg = load_replicated(out, state, model_config=base.config.to_dict())
    deeper = _llama(cfg["num_hidden_layers"])
    deeper.load_state_dict({k: n2t(np.asarray(v)) for k, v in loaded.merge(replicated).items()})
    np.testing.assert_allclose(_logits(deeper), _logits(pmodel), rtol=1e-5, atol=1e-5)


def test_peft_replicates_again_for_a_second_adapter(tmp_path):
    """PEFT 0.21.2's quirk (specs/lora.md, section 12): ``load_adapter`` of a second ``layer_replication`` adapter
    replicates the already replicated layers, so with [[0, 2], [1, 3]] new layer 3 becomes a copy of base layer 1
    (it was base layer 2's)."""
    state = _base_state()
    ad = pm.create_adapter(state, {"peft_type": "LORA", "r": 2, "target_modules": ["q_proj"],
                                   "layer_replication": [[0, 2], [1, 3]]}, seed=0)
    pm.save_adapter(ad, tmp_path / "a")
    pmodel = _load(tmp_path / "a")
    layers = pmodel.base_model.model.model.layers

    def base_of(j):
        w = t2n(layers[j].self_attn.q_proj.base_layer.weight)
        return [i for i in range(3) if np.array_equal(w, state[f"model.layers.{i}.self_attn.q_proj.weight"])]

    assert [base_of(j) for j in range(4)] == [[0], [1], [1], [2]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pmodel.load_adapter(str(tmp_path / "a"), adapter_name="second")
    layers = pmodel.base_model.model.model.layers
    assert [base_of(j) for j in range(4)] == [[0], [1], [1], [1]]
