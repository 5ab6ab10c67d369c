"""Built-in tasks with generated data and checkable answers (no download)."""

from alignkit.tasks import arithmetic

__all__ = ["arithmetic"]
