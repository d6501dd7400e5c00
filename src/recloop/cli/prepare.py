"""recloop CLI: prepare commands."""

from __future__ import annotations
