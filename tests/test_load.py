"""Load on the embedded memory: 8 search threads while one thread ingests (benchmarks/load.py at a small
scale; the 200k-pair run and its latencies are a benchmark, not a test). The server variant, reader
processes while one writes, is in test_server.py (it needs Docker)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from load import run_load  # noqa: E402


@pytest.mark.slow
def test_searches_during_ingest_see_no_errors_and_every_write_stays():
    row = run_load(n=30_000, dim=64, threads=8)
    assert row["errors"] == 0, row["first_errors"]
    assert row["acknowledged"] == 30_000 and row["all_visible"]
    assert row["searches"] > 8  # every thread ran while the writes went on
