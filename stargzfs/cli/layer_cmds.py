"""Commands that work on a single layer file, no registry: ``convert-layer``."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Placeholder until the eStargz writer lands."""
