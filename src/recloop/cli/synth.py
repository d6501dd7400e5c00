"""recloop CLI: synth commands."""

from __future__ import annotations
