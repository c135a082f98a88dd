"""One pane, one module."""
