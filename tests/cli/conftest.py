"""Fixtures for the command-line tests: small models on disk (single file, shards, bf16) and adapters."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest

import peftmath as pm
from peftmath.adapter import Adapter
from peftmath.cli import main
from peftmath.io.safetensors import DTYPES, save_file
from peftmath.layers import Layer
from peftmath.methods.lora import LoraConfig, LoraModule

BF16 = DTYPES["BF16"]
N_LAYERS = 3


def model_state(dtype=np.float32, seed: int = 0) -> dict[str, np.ndarray]:
    """A tiny Llama-like state dict: q_proj (16, 12) with bias, square v_proj, embeddings, a norm, lm_head."""
    rng = np.random.default_rng(seed)
    st = {"model.embed_tokens.weight": rng.standard_normal((30, 12))}
    for i in range(N_LAYERS):
        st[f"model.layers.{i}.q_proj.weight"] = rng.standard_normal((16, 12)) / 4
        st[f"model.layers.{i}.q_proj.bias"] = rng.standard_normal(16) / 10
        st[f"model.layers.{i}.v_proj.weight"] = rng.standard_normal((12, 12)) / 4
        st[f"model.layers.{i}.norm.weight"] = 1 + rng.standard_normal(12) / 10
    st["lm_head.weight"] = rng.standard_normal((30, 12)) / 4
    st["model.step"] = np.array([7], dtype=np.int64)
    return {k: (v if v.dtype == np.int64 else v.astype(dtype)) for k, v in st.items()}


def write_model(path: Path, state: dict[str, np.ndarray], shards: int = 1) -> Path:
    """A .safetensors file (shards=1, path ends in .safetensors) or a folder of shards with an index."""
    meta = {"format": "pt", "note": "cli test"}
    if shards == 1 and path.suffix == ".safetensors":
        save_file(state, path, metadata=meta)
        return path
    path.mkdir(parents=True)
    keys = sorted(state)
    weight_map = {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in keys[s::shards]}
        save_file(part, path / name, metadata=meta)
        weight_map.update({k: name for k in part})
    index = {"metadata": {"total_size": int(sum(v.nbytes for v in state.values()))}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    (path / "config.json").write_text(json.dumps({"model_type": "tiny"}))
    return path


def make_lora(path: Path, state: dict[str, np.ndarray], targets: list[str], *, seed: int = 1, r: int = 4,
              alpha: float = 8, use_dora: bool = False, rank_pattern: dict | None = None,
              dtype=np.float32) -> Adapter:
    """A LoRA (or DoRA) adapter with random non-zero factors on ``targets``, written to ``path``."""
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False, use_dora=use_dora,
                     rank_pattern=dict(rank_pattern or {}))
    params = {}
    for j, m in enumerate(targets):
        w = state[f"{m}.weight"]
        kind = "Embedding" if "embed" in m else None
        layer = Layer.of(w.shape, kind)
        p, _ = LoraModule.initialize(m, cfg, layer, weight=w.astype(np.float32), seed=seed * 100 + j)
        params[m] = {k: np.asarray(v).astype(dtype) for k, v in p.items()}
    ad = Adapter(cfg, params)
    pm.save_adapter(ad, path)
    return ad


def tree_digest(*paths: Path) -> dict[str, str]:
    """sha256 of every file under ``paths`` (to check that inputs are never modified)."""
    out = {}
    for p in paths:
        files = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file())
        for q in files:
            out[str(q)] = hashlib.sha256(q.read_bytes()).hexdigest()
    return out


@pytest.fixture
def cli(capsys):
    """Run ``peftmath ARGS`` in-process: returns (exit status, stdout, stderr)."""

    def run(*args):
        rc = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return rc, out, err

    return run


@pytest.fixture
def f32_model(tmp_path):
    state = model_state()
    return write_model(tmp_path / "base.safetensors", state), state


@pytest.fixture
def lora_targets():
    return [f"model.layers.{i}.q_proj" for i in range(N_LAYERS)] + [f"model.layers.{i}.v_proj" for i in range(N_LAYERS)]


PYTHON = sys.executable


@pytest.fixture
def h():
    """The helpers above, for test modules (``conftest`` is not importable by name from here)."""
    from types import SimpleNamespace

    return SimpleNamespace(model_state=model_state, write_model=write_model, make_lora=make_lora,
                           tree_digest=tree_digest, BF16=BF16, N_LAYERS=N_LAYERS, PYTHON=PYTHON)
