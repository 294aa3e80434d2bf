"""lakelens: natural-language image search over a data lake."""

__version__ = "0.1.0"
