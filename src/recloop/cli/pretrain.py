"""recloop CLI: pretrain commands."""

from __future__ import annotations
