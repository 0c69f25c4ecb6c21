"""llmray: raw text to a served, compressed language model on Ray, driven by one cluster config."""

from __future__ import annotations

__version__ = "0.1.0"
