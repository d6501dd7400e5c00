"""recloop CLI: train commands."""

from __future__ import annotations
