"""Start-up: ``import peftmath`` and the command's parser import no heavy library (issue #20, item 4).

Each check runs in a fresh interpreter (the test process has imported everything already) and reads
``sys.modules`` there. These are correctness checks on what gets imported, not timings; the times are
measured by ``benchmarks/bench_startup.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("numpy", "ml_dtypes", "scipy", "matplotlib", "torch", "safetensors", "jax", "tqdm")


def _modules_after(code: str) -> dict:
    """Run ``code`` in a fresh interpreter (this checkout first on the path); return the JSON it prints
    last, plus the heavy modules it left in ``sys.modules`` under ``"heavy"``."""
    probe = (f"{code}\nimport sys, json\n"
             f"print(json.dumps({{'heavy': sorted(m for m in {HEAVY!r} if m in sys.modules), **globals().get('OUT', {{}})}}))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    p = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, env=env, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("code", [
    "import peftmath",
    "import peftmath.cli",
    "from peftmath.cli import build_parser; build_parser().format_help()",
    "from peftmath.cli import main\nimport contextlib, io\nwith contextlib.redirect_stdout(io.StringIO()):\n"
    "    assert main(['--help']) == 0\n    assert main(['merge', '--help']) == 0",
])
def test_import_and_help_load_no_heavy_library(code):
    """``import peftmath``, ``import peftmath.cli`` and ``peftmath --help`` load none of NumPy, ml_dtypes,
    SciPy, matplotlib, torch, safetensors, JAX or tqdm (the commands import what they need)."""
    assert _modules_after(code)["heavy"] == []


def test_probe_sees_an_import():
    """The probe can fail: a heavy import is reported."""
    assert _modules_after("import numpy")["heavy"] == ["numpy"]


def test_public_names_resolve_on_first_use():
    """Every name of ``__all__`` (and ``dir()``) resolves lazily to the object it was before: the class or
    function of its module; ``peftmath.combine`` stays the function after its submodule is imported."""
    code = """
import peftmath as pm
before = dir(pm)
import peftmath.combine
from peftmath.combine import COMBINATION_TYPES
from peftmath import *
from peftmath import combine as c2
import peftmath.io, peftmath.methods.lora, peftmath.formats, peftmath.multi, peftmath.create, peftmath.adapter
OUT = {
    "all_resolved": all(getattr(pm, n) is not None for n in pm.__all__),
    "combine_is_function": callable(pm.combine) and pm.combine.__module__ == "peftmath.combine"
                           and c2 is pm.combine and not isinstance(pm.combine, type(pm)),
    "same_objects": [pm.load_adapter is peftmath.io.load_adapter, pm.LoraConfig is peftmath.methods.lora.LoraConfig,
                     pm.convert is peftmath.formats.convert, pm.AdapterSet is peftmath.multi.AdapterSet,
                     pm.create_adapter is peftmath.create.create_adapter, pm.Adapter is peftmath.adapter.Adapter,
                     pm.backends.__name__ == "peftmath.backends", pm.errors.PeftMathError is pm.PeftMathError],
    "dir_before_has_all": sorted(set(pm.__all__) - set(before)),
    "dir_stable": sorted(set(before) ^ set(dir(pm))),
    "dir_resolves": [n for n in before if not hasattr(pm, n)],
    "no_helpers_in_dir": [n for n in before if n.startswith("_") and not n.startswith("__")
                          and n not in ("_array", "_linalg", "_peft_tables")],
}
"""
    out = _modules_after(code)
    assert out["all_resolved"] and out["combine_is_function"]
    assert out["same_objects"] == [True] * 8
    assert out["dir_before_has_all"] == [] and out["dir_resolves"] == [] and out["no_helpers_in_dir"] == []
    assert out["dir_stable"] == []


def test_unknown_attribute_is_an_attribute_error():
    import peftmath

    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        peftmath.not_a_name  # noqa: B018
    assert not hasattr(peftmath, "not_a_name")


def test_a_bfloat16_lora_merge_never_imports_ml_dtypes(tmp_path):
    """``peftmath merge`` of a bfloat16 base with a float32 LoRA reads the header without ml_dtypes (a code's
    item size is known) and widens / rounds the weights as uint16 bits (io/bf16.py): importing ml_dtypes costs
    about 0.9 s. The output equals the in-process merge's, bit for bit."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    import numpy as np

    import peftmath as pm
    from peftmath.io.safetensors import SafeTensorsFile, save_file
    from peftmath.methods.lora import LoraConfig

    rng = np.random.default_rng(0)
    state = {f"l{i}.weight": rng.standard_normal((32, 16)).astype(ml_dtypes.bfloat16) for i in range(2)}
    state["emb.weight"] = rng.standard_normal((10, 16)).astype(ml_dtypes.bfloat16)  # copied untouched
    save_file(state, tmp_path / "base.safetensors")
    ad = pm.create_adapter({k: v.astype(np.float32) for k, v in state.items() if k.startswith("l")},
                           LoraConfig(r=2, lora_alpha=4, target_modules=["l0", "l1"], init_lora_weights=False))
    pm.save_adapter(ad, tmp_path / "ad")
    out = _modules_after(
        "from peftmath.cli import main\n"
        f"assert main(['merge', {str(tmp_path / 'base.safetensors')!r}, {str(tmp_path / 'ad')!r}, '-o', "
        f"{str(tmp_path / 'out.safetensors')!r}, '-q']) == 0")
    assert "ml_dtypes" not in out["heavy"], out
    got = SafeTensorsFile(tmp_path / "out.safetensors")
    want = ad.merge(state)
    for k in state:
        assert np.asarray(got[k]).view(np.uint16).tobytes() == np.asarray(want[k]).view(np.uint16).tobytes(), k


def test_a_merge_defers_numpys_unused_submodules_and_the_format_readers(tmp_path):
    """``peftmath merge`` of a PEFT folder imports neither the format readers (peftmath.formats: a PEFT folder is
    recognised by its two files) nor what array_api_compat's NumPy namespace would pull in through NumPy's lazy
    submodules (numpy.f2py with charset_normalizer, numpy.testing with unittest): those are lazy modules, the
    same objects as before (``xp.testing is numpy.testing``), loaded on first use. The output is the in-process
    merge's, bit for bit."""
    import numpy as np

    import peftmath as pm
    from peftmath.io.safetensors import SafeTensorsFile, save_file
    from peftmath.methods.lora import LoraConfig

    rng = np.random.default_rng(1)
    state = {f"l{i}.weight": rng.standard_normal((24, 16)).astype(np.float32) for i in range(2)}
    save_file(state, tmp_path / "base.safetensors")
    ad = pm.create_adapter(state, LoraConfig(r=2, lora_alpha=4, target_modules=["l0", "l1"], init_lora_weights=False))
    pm.save_adapter(ad, tmp_path / "ad")
    out = _modules_after(
        "from peftmath.cli import main\n"
        f"assert main(['merge', {str(tmp_path / 'base.safetensors')!r}, {str(tmp_path / 'ad')!r}, '-o', "
        f"{str(tmp_path / 'out.safetensors')!r}, '-q']) == 0\n"
        "import sys, numpy\n"
        "loaded = sorted(m for m in ('peftmath.formats', 'numpy.f2py.f2py2e', 'charset_normalizer', 'unittest',"
        " 'numpy.testing._private', 'numpy.ma.core', 'array_api_compat.numpy') if m in sys.modules)\n"
        "import array_api_compat.numpy as xp\n"
        "same = [xp.testing is numpy.testing, xp.f2py is numpy.f2py, xp.ma is numpy.ma,"
        " sys.modules['numpy.testing'] is numpy.testing]\n"
        "numpy.testing.assert_array_equal(xp.ma.masked_array([1, 2]).data, [1, 2])\n"
        "import numpy.testing as nt\n"
        "OUT = {'loaded': loaded, 'same': same, 'used': nt is numpy.testing and 'numpy.testing._private' in sys.modules}")
    assert out["loaded"] == ["array_api_compat.numpy"], out
    assert out["same"] == [True] * 4 and out["used"]
    got = SafeTensorsFile(tmp_path / "out.safetensors")
    want = ad.merge(state)
    for k in state:
        assert np.asarray(got[k]).tobytes() == np.asarray(want[k]).tobytes(), k


def test_python_dash_m_runs_the_command():
    """``python -m peftmath`` is the ``peftmath`` command (same help, same exit codes)."""
    import subprocess
    import sys

    ok = subprocess.run([sys.executable, "-m", "peftmath", "--help"], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and ok.stdout.startswith("usage: peftmath")
    bad = subprocess.run([sys.executable, "-m", "peftmath", "no-such-command"], capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode != 0 and "no-such-command" in bad.stderr
