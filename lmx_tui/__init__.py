"""lmx Textual app."""
