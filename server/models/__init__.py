"""Model management: the control plane's service (service.py)."""

from server.models.service import ModelService

__all__ = ["ModelService"]
