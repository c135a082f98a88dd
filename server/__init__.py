"""lmx: local LLM server manager (headless core)."""

__version__ = "0.1.0"
