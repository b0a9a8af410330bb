"""Where a run came from: the data splits it read (a digest of their files), the code (git commit),
the package versions, and the cached features it trained on. No MLflow here: tracking.py logs it."""

from __future__ import annotations

import hashlib
import os
import subprocess
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import clothing
from clothing.data import ClothingDataset, shown

PACKAGES = ("torch", "torchvision", "optuna", "mlflow")
CHECKOUT = Path(clothing.__file__).resolve().parent.parent  # the code's own folder, a git checkout or not


@dataclass(frozen=True)
class SplitRecord:
    """One split as MLflow's dataset inputs show it: `digest` changes when any file is added,
    removed, renamed or resized."""

    name: str  # train, validation, test
    digest: str
    source: str  # the split's folder
    profile: dict = field(default_factory=dict)  # image and class counts


def split_record(name: str, split: ClothingDataset) -> SplitRecord:
    digest = hashlib.sha256()
    for path in split.image_paths:  # sorted by class, then name
        digest.update(os.fsencode(os.path.relpath(path, split.root)) + b"\0")
        digest.update(str(os.stat(path).st_size).encode() + b"\n")
    counts = {shown(c): split.labels.count(i) for c, i in split.class_to_idx.items()}
    profile = {"images": len(split.image_paths), "classes": counts}
    return SplitRecord(name, digest.hexdigest()[:16], shown(Path(split.root).resolve()), profile)


def code_tags() -> dict[str, str]:
    """The git commit of the code (and whether its tree had changes), when it runs from a checkout,
    and the versions of the packages that decide the numbers."""
    tags = {f"sweep.version.{name}": _version(name) for name in (*PACKAGES, "clothing-sweep")}
    try:
        commit = subprocess.run(
            ["git", "-C", str(CHECKOUT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        status = subprocess.run(
            ["git", "-C", str(CHECKOUT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):  # no git here
        return tags
    if commit.returncode == 0:
        tags["mlflow.source.git.commit"] = commit.stdout.strip()
        tags["sweep.git.dirty"] = str(bool(status.stdout.strip())).lower()
    return tags


def _version(name: str) -> str:
    if name == "clothing-sweep":
        return clothing.__version__
    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"
