"""Tasks with checkable answers: `arithmetic` generates its problems from a seed (no download); `word_problems`
reads MAWPS-family word problems from the shared data folder."""

from alignkit.tasks import arithmetic, word_problems

__all__ = ["arithmetic", "word_problems"]
