"""Fine-tuning suite for LLaMA-family models: see README.md."""

from pathlib import Path


def shipped_dir(name: str) -> Path:
    """`recipes/` or `data/`: the checkout's folder (editable install), else the copy a wheel carries inside
    the package."""
    package = Path(__file__).resolve().parent
    checkout = package.parent / name
    return checkout if checkout.is_dir() else package / name
