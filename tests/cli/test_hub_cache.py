"""Models in the Hugging Face hub cache layout: a snapshot folder of relative symlinks into ``blobs/``.

``hub_snapshot`` builds the layout the hub library writes (``models--org--name/blobs/<sha256>``,
``snapshots/<revision>/<file> -> ../../blobs/<sha256>``, ``refs/main``) from a plain model folder.
The command must read through the links, write regular files (contents, not links), name the side
files it copied, and still refuse shard names that leave the folder. (Loading the output in
transformers: tests/parity/test_merge_parity_e2e.py.)
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

from peftmath.io.stream import open_model

TARGETS = ["model.layers.0.q_proj", "model.layers.1.v_proj"]


def hub_snapshot(src: Path, cache: Path, repo: str = "org/name", revision: str = "0123abcd" * 5) -> Path:
    """Copy the files of folder ``src`` into a hub-cache repo under ``cache`` (content-addressed blobs,
    relative links); return the snapshot folder."""
    root = cache / ("models--" + repo.replace("/", "--"))
    (root / "blobs").mkdir(parents=True)
    snap = root / "snapshots" / revision
    snap.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        data = f.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.join("..", "..", "blobs", blob.name), snap / f.name)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(revision)
    return snap


SIDE = {"config.json": json.dumps({"model_type": "tiny", "torch_dtype": "float32"}),
        "tokenizer.json": json.dumps({"version": "1.0", "model": {"type": "BPE"}}),
        "generation_config.json": json.dumps({"max_new_tokens": 5})}


def _model_folder(tmp: Path, h, shards: int) -> tuple[Path, dict]:
    state = h.model_state()
    folder = tmp / "plain"
    if shards == 1:
        folder.mkdir()
        h.write_model(folder / "model.safetensors", state)
    else:
        h.write_model(folder, state, shards=shards)
    for name, text in SIDE.items():
        (folder / name).write_text(text)
    return folder, state


def _read(model: Path) -> dict[str, np.ndarray]:
    m = open_model(model)
    return {k: np.array(m.read(k)) for k in m.keys()}


@pytest.mark.parametrize("shards", [1, 3])
def test_merge_a_hub_snapshot(cli, tmp_path, h, shards):
    folder, state = _model_folder(tmp_path, h, shards)
    h.make_lora(tmp_path / "lora", state, TARGETS)
    # the reference: the same model as a plain folder (copied before it becomes the cache)
    plain = tmp_path / "plain-copy"
    plain.mkdir()
    for f in folder.iterdir():
        (plain / f.name).write_bytes(f.read_bytes())
    snap = hub_snapshot(folder, tmp_path / "hub")
    assert all(p.is_symlink() for p in snap.iterdir())
    before = h.tree_digest(tmp_path / "hub")
    rc, _, err = cli("merge", snap, tmp_path / "lora", "-o", tmp_path / "out")
    assert rc == 0, err
    assert "side files copied: config.json, generation_config.json, tokenizer.json" in err
    assert cli("merge", plain, tmp_path / "lora", "-o", tmp_path / "ref", "-q")[0] == 0
    out = tmp_path / "out"
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(p.name for p in snap.iterdir())
    for p in out.iterdir():  # regular files with the contents, never links into the cache
        assert p.is_file() and not p.is_symlink(), p
        assert p.read_bytes() == (tmp_path / "ref" / p.name).read_bytes(), p.name
    for name, text in SIDE.items():
        assert (out / name).read_text() == text
    merged, ref = _read(out), _read(tmp_path / "ref")
    for k in state:
        assert merged[k].tobytes() == ref[k].tobytes(), k
    assert any(merged[k].tobytes() != state[k].tobytes() for k in state)
    assert h.tree_digest(tmp_path / "hub") == before  # the cache is never written


def test_a_single_file_given_by_its_link(cli, tmp_path, h):
    folder, state = _model_folder(tmp_path, h, 1)
    h.make_lora(tmp_path / "lora", state, TARGETS)
    snap = hub_snapshot(folder, tmp_path / "hub")
    out = tmp_path / "m.safetensors"
    rc, _, err = cli("merge", snap / "model.safetensors", tmp_path / "lora", "-o", out)
    assert rc == 0, err
    assert out.is_file() and not out.is_symlink() and set(_read(out)) == set(state)


def test_shard_names_still_cannot_leave_the_folder(cli, tmp_path, h):
    folder, state = _model_folder(tmp_path, h, 2)
    h.make_lora(tmp_path / "lora", state, TARGETS)
    snap = hub_snapshot(folder, tmp_path / "hub")
    index = json.loads((snap / "model.safetensors.index.json").read_text())
    shard = next(iter(index["weight_map"].values()))
    for bad in (f"../{snap.name}/{shard}", f"../../blobs/{os.readlink(snap / shard).rsplit('/', 1)[-1]}",
                str((snap / shard).resolve()), f"sub/{shard}"):
        idx = {**index, "weight_map": {k: (bad if v == shard else v) for k, v in index["weight_map"].items()}}
        (snap / "model.safetensors.index.json").unlink()  # replace the link by a file (the blob is kept)
        (snap / "model.safetensors.index.json").write_text(json.dumps(idx))
        rc, _, err = cli("merge", snap, tmp_path / "lora", "-o", tmp_path / "x")
        assert rc == 1 and "points outside the model folder" in err, (bad, err)
        assert not (tmp_path / "x").exists()


def test_links_that_are_not_regular_files(cli, tmp_path, h):
    folder, state = _model_folder(tmp_path, h, 2)
    h.make_lora(tmp_path / "lora", state, TARGETS)
    snap = hub_snapshot(folder, tmp_path / "hub")
    # side entries that cannot be copied are named in the summary, not dropped in silence
    os.symlink("../../blobs/not-downloaded", snap / "special_tokens_map.json")
    (snap / "original").mkdir()
    (snap / "pytorch_model.bin").write_bytes(b"never copied")
    rc, _, err = cli("merge", snap, tmp_path / "lora", "-o", tmp_path / "out")
    assert rc == 0, err
    assert ("not copied: original (folder), pytorch_model.bin (weights not in the model), "
            "special_tokens_map.json (broken symlink)") in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        ["config.json", "generation_config.json", "tokenizer.json", "model.safetensors.index.json",
         "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"])
    # a shard that is a broken link, or a link to a folder: a clear error
    shard = snap / "model-00001-of-00002.safetensors"
    target = os.readlink(shard)
    shard.unlink()
    os.symlink("../../blobs/missing", shard)
    rc, _, err = cli("merge", snap, tmp_path / "lora", "-o", tmp_path / "y")
    assert rc == 1 and "no such model file (a broken symlink to ../../blobs/missing)" in err
    shard.unlink()
    os.symlink("../../blobs", shard)
    rc, _, err = cli("merge", snap, tmp_path / "lora", "-o", tmp_path / "y")
    assert rc == 1 and "not a regular file" in err and not (tmp_path / "y").exists()
    shard.unlink()
    os.symlink(target, shard)
    assert cli("merge", snap, tmp_path / "lora", "-o", tmp_path / "y", "-q")[0] == 0
