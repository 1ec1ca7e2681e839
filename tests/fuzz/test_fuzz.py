"""The quick fuzz run of every reader (a few hundred cases each; the long run is `python -m tests.fuzz.fuzzers`)."""

from __future__ import annotations

import os

import pytest

from .fuzzers import READERS

CASES = int(os.environ.get("PEFTMATH_FUZZ_CASES", 300))


@pytest.mark.parametrize("reader", list(READERS))
def test_reader_raises_only_project_errors(reader):
    outcome = READERS[reader](CASES, seed=1234)
    assert outcome.cases == CASES
    assert not outcome.failures, "\n".join(outcome.failures[:10])
    assert outcome.refused > 0  # the mutations really exercise the error paths
