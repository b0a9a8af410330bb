"""Transfer learning on image folders (the clothing dataset by default): images -> frozen MobileNetV2
features -> a small head.

This package knows nothing of Optuna or MLflow; the sweep tool in `sweep/` builds on it.
"""

__version__ = "0.1.0"  # the one place the version lives (pyproject.toml reads it)
