"""Placeholder: this command group's module is being written."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """No commands yet."""
