"""File modes of everything a command writes: what `cp` or `save_pretrained` would give, whatever the umask.

Outputs are built in a temporary sibling (``tempfile.mkstemp`` / ``mkdtemp``: 0600 / 0700) and renamed
into place; a model server running as another user must still be able to read them. Every path a
command creates must have ``0o666 & ~umask`` (files) or ``0o777 & ~umask`` (folders), under the usual
umask 022, a private 077 and a group-writable 002. Inputs are chmod-ed to 0644 first, so a copy that
kept its source's mode would show.
"""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest

from peftmath.cli import main

TARGETS = ["model.layers.0.q_proj", "model.layers.1.v_proj"]


def _tree(root):
    """Every path under ``root`` (files and folders), recursively."""
    return {p for p in root.rglob("*")}


def _prepare(tmp, h):
    """Inputs of every command, written under umask 022 and made 0644 / 0755."""
    state = h.model_state()
    h.write_model(tmp / "base.safetensors", state)
    h.write_model(tmp / "shards", state, shards=2)
    (tmp / "shards" / "tokenizer.json").write_text("{}")
    h.make_lora(tmp / "lora", state, TARGETS, seed=1)
    h.make_lora(tmp / "lora2", state, TARGETS, seed=2)
    h.make_lora(tmp / "dora", state, TARGETS, seed=3, use_dora=True)
    tuned = dict(state)
    rng = np.random.default_rng(5)
    for m in TARGETS:
        w = state[f"{m}.weight"]
        tuned[f"{m}.weight"] = (w + 0.01 * rng.standard_normal(w.shape)).astype(w.dtype)
    h.write_model(tmp / "tuned.safetensors", tuned)
    cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "init_lora_weights": "pissa"}
    (tmp / "pissa.json").write_text(json.dumps(cfg))
    assert main(["merge", str(tmp / "shards"), str(tmp / "dora"), "-o", str(tmp / "merged"), "-q"]) == 0
    for p in [tmp, *_tree(tmp)]:
        os.chmod(p, 0o755 if p.is_dir() else 0o644)


#: command -> argv (paths relative to the test folder; "OUT" is the output)
COMMANDS = {
    "merge-file": ["merge", "base.safetensors", "lora", "-o", "OUT.safetensors"],
    "merge-folder": ["merge", "shards", "lora", "-o", "OUT"],
    "merge-dora-records": ["merge", "shards", "dora", "-o", "OUT"],
    "unmerge-folder": ["unmerge", "merged", "dora", "-o", "OUT"],
    "extract": ["extract", "base.safetensors", "tuned.safetensors", "--rank", "2", "-o", "OUT"],
    "init": ["init", "base.safetensors", "--target", "q_proj", "-o", "OUT"],
    "init-base-out-file": ["init", "base.safetensors", "--config", "pissa.json", "--base-out", "NEW.safetensors",
                           "-o", "OUT"],
    "init-base-out-folder": ["init", "shards", "--config", "pissa.json", "--base-out", "NEW", "-o", "OUT"],
    "combine": ["combine", "lora", "lora2", "--method", "svd", "-o", "OUT"],
    "convert-peft": ["convert", "lora", "--to", "peft", "-o", "OUT"],
    "convert-kohya": ["convert", "lora", "--to", "kohya", "-o", "OUT.safetensors"],
    "convert-mlx": ["convert", "lora", "--to", "mlx", "-o", "OUT"],
    "demo": ["demo", "OUT"],
}


INPUTS = {"base.safetensors", "tuned.safetensors", "shards", "merged", "lora", "lora2", "dora", "pissa.json"}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from types import SimpleNamespace

    from tests.cli.conftest import make_lora, model_state, write_model

    tmp = tmp_path_factory.mktemp("modes")
    old = os.umask(0o022)
    try:
        _prepare(tmp, SimpleNamespace(model_state=model_state, write_model=write_model, make_lora=make_lora))
    finally:
        os.umask(old)
    return tmp


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002], ids=lambda m: f"umask{m:03o}")
@pytest.mark.parametrize("command", list(COMMANDS))
def test_outputs_get_the_modes_of_new_files(inputs, tmp_path, command, umask):
    import shutil

    work = tmp_path / "w"
    shutil.copytree(inputs, work, symlinks=True)  # (copytree keeps the inputs' modes)
    argv = [str(work / a) if a in INPUTS or a.startswith(("OUT", "NEW")) else a for a in COMMANDS[command]]
    before = {work, *_tree(work)}
    old = os.umask(umask)
    try:
        rc = main([*argv, "-q"])
    finally:
        os.umask(old)
    assert rc == 0
    created = {work, *_tree(work)} - before
    assert created, "the command wrote nothing"
    assert any(p.name.startswith(("OUT", "NEW")) for p in created)
    wrong = {}
    for p in sorted(created):
        mode = stat.S_IMODE(p.lstat().st_mode)
        want = (0o777 if p.is_dir() else 0o666) & ~umask
        if mode != want:
            wrong[str(p.relative_to(work))] = f"{mode:04o} (want {want:04o})"
    assert not wrong, wrong
    for p in before - {work}:  # inputs keep their modes
        assert stat.S_IMODE(p.lstat().st_mode) == (0o755 if p.is_dir() else 0o644), p


def test_temp_sibling_modes_follow_the_umask(tmp_path):
    from peftmath.io.atomic import current_umask, temp_sibling

    old = os.umask(0o027)
    try:
        assert current_umask() == 0o027
        f = temp_sibling(tmp_path / "x.safetensors")
        d = temp_sibling(tmp_path / "y", folder=True)
    finally:
        os.umask(old)
    assert current_umask() == old
    assert stat.S_IMODE(f.stat().st_mode) == 0o640 and stat.S_IMODE(d.stat().st_mode) == 0o750
    assert f.name.startswith(".x.safetensors.pid") and d.is_dir()
