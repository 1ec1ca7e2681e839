"""`peftmath demo`: every example of every implemented method's description appears and verifies."""

from __future__ import annotations

import subprocess

from peftmath.methods import describe_method, implemented_methods
from tests.helpers import requirements_met


def _expected_rows():
    rows = []
    for t in implemented_methods():
        m = describe_method(t)
        if m.merges_weights and requirements_met(m):  # the demo skips a method whose extra package is missing
            rows += list(m.examples)
    return rows


def test_demo_in_process(cli, tmp_path):
    rc, out, err = cli("demo", tmp_path / "d")
    assert rc == 0, err
    table = [ln for ln in out.splitlines()[2:] if ln.strip()]
    labels = [ln.split("  ")[0].strip() for ln in table]
    assert labels == _expected_rows()
    assert all(ln.rstrip().endswith("ok") for ln in table)
    for ln in table:  # the errors printed are small (the bound is checked by the demo itself)
        cols = ln.split()
        assert any(c.endswith(("e-06", "e-07", "e-08", "e-09", "e-10")) or c == "0.00e+00" for c in cols), ln
    d = tmp_path / "d"
    assert (d / "model.safetensors").exists() and (d / "adapter-lora" / "adapter_config.json").exists()
    # the folder is not empty now: refused without --force
    rc, _, err = cli("demo", d)
    assert rc == 1 and "--force" in err
    assert cli("demo", d, "--force", "-q")[0] == 0


def test_demo_console_script(tmp_path, h):
    p = subprocess.run(["peftmath", "demo"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "example" in p.stdout.splitlines()[0] and "LORA" in p.stdout
    assert "examples in" in p.stderr  # logs on stderr


def test_demo_skips_a_broken_method(cli, monkeypatch):
    """A method whose example cannot be built is skipped with its reason on stderr; the rest still run."""
    import dataclasses

    from peftmath.methods import lora

    broken = dataclasses.replace(lora.METHOD, examples={**lora.METHOD.examples, "Broken": {"r": -3}})
    monkeypatch.setattr(lora, "METHOD", broken)  # the demo reads the examples from the description
    rc, out, err = cli("demo")
    assert rc == 0, err
    assert "skipping Broken (LORA)" in err and "Broken" not in out


def test_demo_is_warning_free_under_strict(cli, tmp_path):
    """The demo's own adapters raise no warning at all: --strict (every peftmath warning an error) passes,
    and nothing on stderr looks like a warning."""
    rc, out, err = cli("demo", tmp_path / "d", "--strict")
    assert rc == 0, err
    assert not [ln for ln in err.splitlines() if "warning:" in ln.lower()] and "Traceback" not in err
    assert all(ln.rstrip().endswith("ok") for ln in out.splitlines()[2:] if ln.strip())


def test_demo_skips_a_method_whose_extra_package_is_missing(cli, monkeypatch):
    """The README's first command runs without torch: a method that needs it (PSOFT: torch's SVD signs define
    the adapter) is skipped, saying what to install, and the demo succeeds."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    rc, out, err = cli("demo")
    assert rc == 0, err
    assert "PSOFT needs torch (pip install torch); skipped" in err and "PSOFT" not in out
