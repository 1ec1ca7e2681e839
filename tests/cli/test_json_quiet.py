"""Every command takes ``--json`` (a machine-readable report on stdout, checked against the files written) and
``-q`` (nothing on stderr, no progress bar even on a terminal); progress bars go to stderr on a terminal only
(issue #20, item 5d). Also: ``extract``'s default (randomized) SVD against ``--exact``."""

from __future__ import annotations

import io
import json
import sys

import numpy as np
import pytest

from peftmath.cli import build_parser
from peftmath.io import read_config
from peftmath.io.safetensors import SafeTensorsFile, load_file

TARGETS = ["model.layers.0.q_proj", "model.layers.1.q_proj"]


class _Terminal(io.StringIO):
    """A stderr that says it is a terminal (so the command draws its progress bars)."""

    def isatty(self) -> bool:
        return True


@pytest.fixture
def files(tmp_path, h):
    state = h.model_state()
    base = h.write_model(tmp_path / "base.safetensors", state)
    h.make_lora(tmp_path / "a", state, TARGETS, seed=1, r=2, alpha=4)
    h.make_lora(tmp_path / "b", state, TARGETS, seed=2, r=2, alpha=4)
    rng = np.random.default_rng(7)
    tuned = dict(state)
    for k in ("model.layers.0.q_proj.weight", "model.layers.1.v_proj.weight"):
        tuned[k] = (state[k] + 0.1 * rng.standard_normal(state[k].shape)).astype(np.float32)
    tp = h.write_model(tmp_path / "tuned.safetensors", tuned)
    return tmp_path, base, tp, state, tuned


def _commands(d, base, tp):
    """One invocation of every command (except verify/diff/demo, below), each writing its own output."""
    return {
        "inspect": ["inspect", d / "a"],
        "merge": ["merge", base, d / "a", "-o", d / "m.safetensors"],
        "merge --dry-run": ["merge", base, d / "a", "-o", d / "dry.safetensors", "--dry-run"],
        "unmerge": ["unmerge", d / "m.safetensors", d / "a", "-o", d / "u.safetensors"],
        "extract": ["extract", base, tp, "--rank", "2", "-o", d / "ex"],
        "combine": ["combine", d / "a", d / "b", "--weights", "0.5", "0.5", "--method", "svd", "-o", d / "c"],
        "convert": ["convert", d / "a", "--to", "kohya", "-o", d / "k.safetensors"],
        "init": ["init", base, "--rank", "2", "--target", "q_proj", "--init", "gaussian", "-o", d / "i"],
        "verify": ["verify", base, d / "a", d / "m.safetensors"],
        "diff": ["diff", base, base],
    }


def test_every_command_has_json(cli, files):
    """Each command's --json output parses, and its numbers are those of what was written."""
    d, base, tp, state, tuned = files
    out = {}
    for name, args in _commands(d, base, tp).items():
        rc, stdout, err = cli(*args, "--json")
        assert rc == 0, (name, err)
        out[name] = json.loads(stdout)
    assert {m["module"] for m in out["inspect"]["modules"]} == set(TARGETS)
    m = out["merge"]
    merged, base_t = load_file(d / "m.safetensors"), load_file(base)
    assert m["command"] == "merge" and m["output"] == str(d / "m.safetensors")
    dry = out["merge --dry-run"]
    assert dry["dry_run"] is True and not (d / "dry.safetensors").exists()
    assert {t["key"] for t in dry["tensors"]} == set(base_t) == set(merged)
    computed = {t["key"] for t in dry["tensors"] if t["operation"] != "copy"}
    changed = {k for k in merged if not np.array_equal(merged[k], base_t[k])}
    assert changed == {f"{t}.weight" for t in TARGETS} and changed <= computed
    assert m["tensors"] == len(merged) and m["adapted"] == len(computed) and m["copied"] == len(merged) - len(computed)
    assert m["bytes_written"] > 0 and m["records_file"] is None
    assert out["unmerge"]["adapted"] == len(computed)
    ex = out["extract"]
    meta = json.loads(SafeTensorsFile(d / "ex" / "adapter_model.safetensors").metadata["peftmath.extract"])
    assert set(ex) == set(meta) == {"model.layers.0.q_proj", "model.layers.1.v_proj"}
    for mod, v in ex.items():
        D = tuned[f"{mod}.weight"].astype(np.float64) - state[f"{mod}.weight"]
        assert v["relative_error"] == meta[mod]["relative_error"] and v["rank"] == meta[mod]["rank"] == 2
        np.testing.assert_allclose(v["delta_norm"], np.linalg.norm(D), rtol=1e-6)  # D formed in float32
    c = out["combine"]
    assert c["r"] == read_config(d / "c").r == 2 and sorted(c["modules"]) == sorted(TARGETS)
    assert set(c["truncation_error"]) == set(TARGETS) and all(0 <= e < 1 for e in c["truncation_error"].values())
    assert out["convert"] == {"command": "convert", "adapter": str(d / "a"), "from": "peft", "to": "kohya",
                              "output": str(d / "k.safetensors")}
    i = out["init"]
    written = load_file(d / "i" / "adapter_model.safetensors")
    assert i["peft_type"] == "LORA" and i["trainable_parameters"] == sum(v.size for v in written.values())
    assert len(i["modules"]) == 3 and {r["module"] for r in i["modules"]} == {f"model.layers.{j}.q_proj" for j in range(3)}
    assert out["verify"]["ok"] is True and out["verify"]["failures"] == []
    assert {t["key"] for t in out["verify"]["tensors"]} == set(merged)
    assert out["diff"]["ok"] is True and len(out["diff"]["tensors"]) == len(base_t)
    parser = build_parser()
    for name in parser._subparsers._group_actions[0].choices:  # every command documents --json in its help
        assert "--json" in parser._subparsers._group_actions[0].choices[name].format_help(), name


def test_quiet_prints_nothing_on_stderr_even_on_a_terminal(files, monkeypatch, capsys):
    """With -q: no progress bar and no log line, even when stderr is a terminal; without -q on a terminal the
    long commands draw a bar (so the check above can fail)."""
    from peftmath.cli import main

    d, base, tp, _, _ = files
    cmds = _commands(d, base, tp)
    for name in ("merge", "extract", "combine", "convert", "init", "inspect", "unmerge"):
        term = _Terminal()
        monkeypatch.setattr(sys, "stderr", term)
        assert main([str(a) for a in cmds[name]] + ["--force"] * (name not in ("inspect",))) == 0, name
        assert "\r" in term.getvalue() or "it/s" in term.getvalue() or "/s]" in term.getvalue(), (name, term.getvalue())
        term = _Terminal()
        monkeypatch.setattr(sys, "stderr", term)
        assert main([str(a) for a in cmds[name]] + ["--force"] * (name not in ("inspect",)) + ["-q"]) == 0, name
        assert term.getvalue() == "", (name, term.getvalue())
    capsys.readouterr()


def test_no_progress_bar_when_stderr_is_not_a_terminal(cli, files):
    d, base, tp, _, _ = files
    rc, _, err = cli("extract", base, tp, "--rank", "2", "-o", d / "ex2")
    assert rc == 0 and "\r" not in err and "it/s" not in err and "wrote LoRA adapter" in err


def test_demo_json(cli):
    rc, out, err = cli("demo", "--json", "-q")
    assert rc == 0, err
    rep = json.loads(out)
    assert rep["failed"] == [] and rep["examples"] and all(e["check"] == "ok" for e in rep["examples"])
    assert all(e["merge_error"] <= rep["bound"] and e["round_trip_error"] <= rep["bound"] for e in rep["examples"])
    assert err == ""


def _power_law_pair(tmp_path, h, alpha):
    """BASE and TUNED differing on two 96 x 160 weights by deltas with singular values i^-alpha (a realistic,
    slowly decaying fine-tuning spectrum) and on one by an exactly rank-3 delta."""
    rng = np.random.default_rng(11)
    state = {f"model.layers.{i}.{p}.weight": (rng.standard_normal((96, 160)) / 10).astype(np.float32)
             for i in range(2) for p in ("q_proj", "v_proj")}
    tuned = dict(state)
    for k in list(state)[:2]:
        U, _ = np.linalg.qr(rng.standard_normal((96, 96)))
        V, _ = np.linalg.qr(rng.standard_normal((160, 96)))
        tuned[k] = (state[k] + ((U * np.arange(1, 97) ** -alpha) @ V.T) / 10).astype(np.float32)
    k = list(state)[2]
    tuned[k] = (state[k] + rng.standard_normal((96, 3)) @ rng.standard_normal((3, 160)) / 10).astype(np.float32)
    return (h.write_model(tmp_path / "pb.safetensors", state), h.write_model(tmp_path / "pt.safetensors", tuned),
            state, tuned)


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_extract_default_agrees_with_exact(cli, tmp_path, h, alpha):
    """The default (randomized) SVD against --exact: each module's achieved error is at least the optimal
    (exact) one and within 1e-4 (relative) of it; the rank-3 delta is captured to rounding either way; both
    errors are those of the factors written (recomputed here from the adapters' tensors in float64)."""
    base, tp, state, tuned = _power_law_pair(tmp_path, h, alpha)
    reports = {}
    for flag in ([], ["--exact"], ["--randomized"]):
        out_dir = tmp_path / f"ex{len(flag)}{''.join(flag)}"
        rc, out, err = cli("extract", base, tp, "--rank", "8", "-o", out_dir, "--json", *flag)
        assert rc == 0, err
        rep = json.loads(out)
        t = load_file(out_dir / "adapter_model.safetensors")
        for mod, v in rep.items():
            A = t[f"base_model.model.{mod}.lora_A.weight"].astype(np.float64)
            B = t[f"base_model.model.{mod}.lora_B.weight"].astype(np.float64)
            D = tuned[f"{mod}.weight"].astype(np.float64) - state[f"{mod}.weight"]
            np.testing.assert_allclose(v["relative_error"], np.linalg.norm(D - B @ A) / np.linalg.norm(D),
                                       rtol=1e-5, atol=1e-6)  # extract forms D in float32
        reports[" ".join(flag) or "default"] = rep
    fast, exact, old_flag = reports["default"], reports["--exact"], reports["--randomized"]
    assert old_flag == fast  # the former flag is the default now
    assert {v["svd"] for v in exact.values()} == {"exact"}
    assert {fast[m]["svd"] for m in fast} == {"randomized"}  # 2·(2·8 + 10) <= 96
    for mod in exact:
        e_x, e_r = exact[mod]["relative_error"], fast[mod]["relative_error"]
        if e_x < 1e-5:  # the rank-3 delta: rounding only
            assert e_r < 1e-5
            continue
        assert e_x * (1 - 1e-9) <= e_r <= e_x * (1 + 1e-4), (mod, e_x, e_r)


def test_extract_total_error_and_flags(cli, files):
    d, base, tp, state, tuned = files
    rc, out, err = cli("extract", base, tp, "--rank", "2", "-o", d / "t1")
    assert rc == 0, err
    rows = {line.split()[0]: line.split() for line in out.splitlines()[2:]}
    rep = json.loads(SafeTensorsFile(d / "t1" / "adapter_model.safetensors").metadata["peftmath.extract"])
    num = den = 0.0
    for mod, v in rep.items():
        D = tuned[f"{mod}.weight"].astype(np.float64) - state[f"{mod}.weight"]
        num += (v["relative_error"] * np.linalg.norm(D)) ** 2
        den += np.linalg.norm(D) ** 2
    total = np.sqrt(num / den)
    assert float(rows["(all"][-1]) == pytest.approx(total, rel=1e-3)
    assert f"relative error over all modules {total:.3e}" in err
    rc, _, err = cli("extract", base, tp, "--rank", "2", "--exact", "--randomized", "-o", d / "t2")
    assert rc == 2 and "not allowed with" in err


def test_init_pissa_points_to_pissa_niter_on_a_large_model(cli, tmp_path, h, monkeypatch):
    """``--init pissa`` on a model above cli.PISSA_HINT_PARAMETERS weight parameters says to use pissa_niter_K
    (lowered here to the tiny model's size); not below it, not with -q, not for pissa_niter_4."""
    from peftmath import cli as cli_module

    state = h.model_state()
    base = h.write_model(tmp_path / "base.safetensors", state)
    n = sum(v.size for k, v in state.items() if k.endswith(".weight") and v.ndim >= 2)
    args = ["init", base, "--rank", "2", "--target", "q_proj", "--base-out", tmp_path / "nb.safetensors", "--force"]
    monkeypatch.setattr(cli_module, "PISSA_HINT_PARAMETERS", n)  # the model is not above it
    rc, _, err = cli(*args, "--init", "pissa", "-o", tmp_path / "p0")
    assert rc == 0 and "pissa_niter" not in err, err
    monkeypatch.setattr(cli_module, "PISSA_HINT_PARAMETERS", n - 1)
    rc, _, err = cli(*args, "--init", "pissa", "-o", tmp_path / "p1")
    assert rc == 0 and "--init pissa_niter_4" in err and f"{n / 1e6:.0f}M weight parameters" in err, err
    rc, _, err = cli(*args, "--init", "pissa", "-o", tmp_path / "p2", "-q")
    assert rc == 0 and err == ""
    rc, _, err = cli(*args, "--init", "pissa_niter_4", "-o", tmp_path / "p3")
    assert rc == 0 and "pissa_niter" not in err, err
    rc, _, err = cli(*args, "--init", "pissa", "-o", tmp_path / "p4", "--strict")  # a hint, not a warning
    assert rc == 0, err
