"""recloop CLI: online commands."""

from __future__ import annotations
