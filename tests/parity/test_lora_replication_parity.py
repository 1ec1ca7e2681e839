"""LoRA with ``layer_replication`` against Hugging Face PEFT 0.21.2 on a tiny Llama (``LlamaConfig``, no download):
the replicated base equals PEFT's (keys, the base layer each copy shares), and the adapter merged into it by
peftmath, loaded into a Llama with the new ``num_hidden_layers``, gives the logits of PEFT's model (unmerged:
PEFT's own ``merge_and_unload`` adds every copy's ΔW into the one weight the copies share, which changes them,
specs/lora.md section 12). ``peftmath.load_adapter`` and ``peftmath merge`` refuse such a folder by name."""

from __future__ import annotations

import io
import contextlib
import warnings

import numpy as np
import pytest

from tests.parity.conftest import n2t, require_peft, t2n

torch, peft = require_peft()

import peftmath as pm  # noqa: E402
from peftmath import cli  # noqa: E402
from peftmath.errors import UnsupportedError  # noqa: E402
from peftmath.io.safetensors import save_file  # noqa: E402
from peftmath.methods.lora_replication import load_replicated  # noqa: E402

pytestmark = [pytest.mark.parity]

IDS = torch.tensor([[1, 5, 9, 2, 30, 7]])


def _config(layers: int):
    import transformers

    return transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                                    num_attention_heads=4, num_key_value_heads=2)


def _llama(layers: int):
    import transformers

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.LlamaForCausalLM(_config(layers)).eval()


def _peft(layer_map, folder):
    model = _llama(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pmodel = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                                                            layer_replication=layer_map))
    rng = np.random.default_rng(1)
    with torch.no_grad():
        for _, p in pmodel.named_parameters():
            if p.requires_grad:
                p.add_(torch.from_numpy(rng.normal(0.0, 0.2, tuple(p.shape)).astype(np.float32)))
    pmodel.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pmodel.save_pretrained(folder)
    return pmodel


def _logits(model) -> np.ndarray:
    with torch.no_grad():
        return t2n(model(input_ids=IDS).logits)


@pytest.mark.parametrize("layer_map", [[[0, 2], [1, 3]], [[0, 3], [0, 3]], [[2, 3], [0, 2]]])
def test_merged_into_the_replicated_base_is_peft_s_model(layer_map, tmp_path):
    pmodel = _peft(layer_map, tmp_path / "adapter")
    want = _logits(pmodel)
    base = _llama(3)
    state = {k: t2n(v) for k, v in base.state_dict().items()}
    ad, replicated, cfg = load_replicated(tmp_path / "adapter", state, model_config=base.config.to_dict())
    n = sum(e - s for s, e in layer_map)
    assert cfg["num_hidden_layers"] == n == pmodel.base_model.model.config.num_hidden_layers
    # the replicated base is PEFT's: every base tensor of its deeper model, by name and value
    theirs = {k.replace(".base_layer", ""): t2n(v) for k, v in pmodel.base_model.model.state_dict().items()
              if "lora_" not in k}
    assert sorted(replicated) == sorted(theirs)
    for k, v in theirs.items():
        assert np.array_equal(replicated[k], v), k
    assert ad.modules == sorted(n for n, m in pmodel.base_model.model.named_modules()
                                if isinstance(m, peft.tuners.lora.LoraLayer))
    records: dict = {}
    merged = ad.merge(replicated, records=records)
    deeper = _llama(n)
    deeper.load_state_dict({k: n2t(np.asarray(v)) for k, v in merged.items()})
    np.testing.assert_allclose(_logits(deeper), want, rtol=1e-5, atol=1e-5)
    for k in state:  # the base's arrays are untouched (the copies share them)
        assert np.array_equal(state[k], t2n(base.state_dict()[k])), k
    back = ad.unmerge(merged)
    for k, v in replicated.items():
        np.testing.assert_allclose(np.asarray(back[k]), v, rtol=1e-6, atol=1e-6, err_msg=k)


def test_peft_s_own_merge_differs_from_its_model(tmp_path):
    """Why peftmath does not reproduce ``merge_and_unload`` here: the copies of a layer share one weight, and
    PEFT adds both copies' ΔW into it, so its merged model is not the model it runs unmerged."""
    pmodel = _peft([[0, 2], [1, 3]], tmp_path / "adapter")
    want = _logits(pmodel)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = pmodel.merge_and_unload()
    assert np.max(np.abs(_logits(merged) - want)) > 1e-4


def test_load_adapter_and_the_command_refuse_by_name(tmp_path):
    _peft([[0, 2], [1, 3]], tmp_path / "adapter")
    with pytest.raises(UnsupportedError, match=r"layer_replication=\[\[0, 2\], \[1, 3\]\] .*load_replicated"):
        pm.load_adapter(tmp_path / "adapter")
    base = _llama(3)
    save_file({k: t2n(v) for k, v in base.state_dict().items()}, tmp_path / "base.safetensors",
              metadata={"format": "pt"})
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = cli.main(["merge", str(tmp_path / "base.safetensors"), str(tmp_path / "adapter"), "-o",
                       str(tmp_path / "m.safetensors")])
    assert rc == 1 and "layer_replication" in err.getvalue() and not (tmp_path / "m.safetensors").exists()
