"""Engines: one loaded model each, behind a small protocol."""
