"""``recloop data …``: download, synthesise and inspect raw datasets."""

from __future__ import annotations
