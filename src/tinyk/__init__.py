"""tinyk: train a small Chinese chat LLM from scratch, the way the tutorial does, as real software."""

__version__ = "0.1.0"
