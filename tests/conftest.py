"""Shared pytest fixtures.

``tiny_checkpoint(arch)`` (session-scoped factory): the folder of a tiny random Hugging Face
checkpoint of ``arch`` (see tests/tiny_models.py for the list), built once per session.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # make tests/*.py helpers importable


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    from tiny_models import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("tiny_checkpoints")
    built: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in built:
            built[arch] = make_tiny_checkpoint(arch, root / arch)
        return built[arch]

    return get
