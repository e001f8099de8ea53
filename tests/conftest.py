"""Shared pytest fixtures. Keep each fixture small and session-scoped where it builds data on disk."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # plain `pytest` (not `python -m pytest`) does not put the repo on sys.path

from util.demo_data import make_demo_dataset  # noqa: E402

# ---- data ------------------------------------------------------------------------------------------------------

DEMO_KW = dict(num_classes=4, train_per_class=8, val_per_class=4, size=32, seed=0)


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny demo ImageFolder: 4 classes x (8 train + 4 val) images, 32 px; root holds train/ and val/. Read-only."""
    return make_demo_dataset(tmp_path_factory.mktemp("demo") / "demo_data", **DEMO_KW)
