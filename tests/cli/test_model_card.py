"""merge / extract --model-card: a README.md with the provenance (adapters, sha256, scale, options, peftmath
version), only when asked; the card's digests are those of the files on disk (hashed here independently),
its table matches the safetensors provenance metadata, and its commands reproduce the output."""

from __future__ import annotations

import hashlib
import json
import shlex

import numpy as np

import peftmath
from peftmath.io.safetensors import SafeTensorsFile
from peftmath.io.stream import PROVENANCE_KEY

TARGETS = ["model.layers.0.q_proj", "model.layers.1.q_proj"]


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _code_lines(card):
    block = card.split("```")[1]
    return [ln for ln in block.strip().splitlines() if ln]


def test_merge_card_only_when_asked(cli, tmp_path, h):
    state = h.model_state()
    base = h.write_model(tmp_path / "base", state, shards=2)
    h.make_lora(tmp_path / "a", state, TARGETS, seed=1)
    h.make_lora(tmp_path / "b", state, ["model.layers.0.v_proj"], seed=2, use_dora=True)
    rc, _, err = cli("merge", base, tmp_path / "a", "-o", tmp_path / "plain", "-q")
    assert rc == 0, err
    assert not (tmp_path / "plain" / "README.md").exists()
    rc, _, err = cli("merge", base, f"{tmp_path / 'a'}:0.5", tmp_path / "b", "-o", tmp_path / "m", "--dtype", "bf16",
                     "--model-card", "-q")
    assert rc == 0, err
    card = (tmp_path / "m" / "README.md").read_text(encoding="utf-8")
    assert card.startswith("---\n") and f"peftmath {peftmath.__version__}" in card
    prov = json.loads(next(iter(SafeTensorsFile(p) for p in sorted((tmp_path / "m").glob("*.safetensors")))).metadata[
        PROVENANCE_KEY])
    assert [e["adapter"] for e in prov] == ["a", "b"]
    for name, scale, method in (("a", "0.5", "LORA"), ("b", "1", "LORA (DoRA)")):
        row = next(ln for ln in card.splitlines() if ln.startswith("| ") and f"| {name} |" in ln)
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1:4] == [name, method, scale]
        # the digests of the files on disk, hashed here
        assert cells[4] == f"`{_sha(tmp_path / name / 'adapter_model.safetensors')}`"
        assert cells[5] == f"`{_sha(tmp_path / name / 'adapter_config.json')}`"
    assert '`dtype`: `"bf16"`' in card or '`dtype`: `"bfloat16"`' in card
    merge_cmd, verify_cmd = _code_lines(card)
    # the card's verify command accepts the output; its merge command reproduces it bit for bit
    rc, _, err = cli(*shlex.split(verify_cmd)[1:])
    assert rc == 0, err
    again = shlex.split(merge_cmd)[1:]
    again[again.index("-o") + 1] = str(tmp_path / "again")
    rc, _, err = cli(*again, "-q")
    assert rc == 0, err
    for p in sorted((tmp_path / "m").glob("*.safetensors")):
        f, g = SafeTensorsFile(p), SafeTensorsFile(tmp_path / "again" / p.name)
        assert all(np.array_equal(np.asarray(f[k]), np.asarray(g[k])) for k in f)
    assert (tmp_path / "again" / "README.md").read_text(encoding="utf-8") == card.replace(
        str(tmp_path / "m"), str(tmp_path / "again")).replace("# m\n", "# again\n")


def test_merge_card_beside_a_single_file_is_not_clobbered(cli, tmp_path, h):
    state = h.model_state()
    base = h.write_model(tmp_path / "base.safetensors", state)
    h.make_lora(tmp_path / "a", state, TARGETS)
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("someone else's card\n")
    rc, _, err = cli("merge", base, tmp_path / "a", "-o", out / "m.safetensors", "--model-card")
    assert rc == 1 and "README.md already exists" in err
    assert not (out / "m.safetensors").exists() and (out / "README.md").read_text() == "someone else's card\n"
    rc, _, err = cli("merge", base, tmp_path / "a", "-o", out / "m.safetensors", "--model-card", "--force", "-q")
    assert rc == 0, err
    card = (out / "README.md").read_text(encoding="utf-8")
    assert f"`{_sha(tmp_path / 'a' / 'adapter_model.safetensors')}`" in card and "| 1 | a | LORA | 1 |" in card


def test_extract_card(cli, tmp_path, h):
    state = h.model_state()
    rng = np.random.default_rng(5)
    tuned = {k: (v + (rng.standard_normal(v.shape).astype(v.dtype) * 0.01 if k.endswith("q_proj.weight") else 0))
             for k, v in state.items()}
    base = h.write_model(tmp_path / "base.safetensors", state)
    ft = h.write_model(tmp_path / "tuned.safetensors", tuned)
    rc, out, err = cli("extract", base, ft, "--rank", "3", "--include", "q_proj", "-o", tmp_path / "x", "--json",
                       "--model-card", "-q")
    assert rc == 0, err
    report = json.loads(out)
    card = (tmp_path / "x" / "README.md").read_text(encoding="utf-8")
    for n in ("adapter_model.safetensors", "adapter_config.json"):
        assert f"- `{n}`: `{_sha(tmp_path / 'x' / n)}`" in card
    assert f"peftmath {peftmath.__version__}" in card and '`rank`: `3`' in card and '`include`: `"q_proj"`' in card
    for m, v in report.items():
        assert f"| {m} | {v['rank']} | {v['relative_error']:.3e} |" in card
    (cmd,) = _code_lines(card)
    again = shlex.split(cmd)[1:]
    again[again.index("-o") + 1] = str(tmp_path / "y")
    rc, _, err = cli(*again, "-q")
    assert rc == 0, err
    assert _sha(tmp_path / "y" / "adapter_model.safetensors") == _sha(tmp_path / "x" / "adapter_model.safetensors")
    rc, _, err = cli("extract", base, ft, "--rank", "3", "-o", tmp_path / "z", "-q")
    assert rc == 0 and not (tmp_path / "z" / "README.md").exists()
