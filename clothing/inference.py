"""Predictions for many image files: files and folders expanded to a sorted list, decoded in loader
processes, and run in batches on an extraction engine (clothing.engines), one result per file.

An unreadable file is a result with an error, never an exception, so one bad photo among 10,000
costs only its own row. The trunk runs as extraction runs it (uint8 pixels in, normalised inside,
OpenVINO for long passes on a CPU), in fp32: a prediction must not depend on the CPU's bf16.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from clothing.data import IMAGE_EXTENSIONS, DatasetError, pixel_transform, shown, try_image
from clothing.engines import build_trunk, resolve_engine
from clothing.extract import TrunkOutputs, default_num_workers, yield_to_engine
from clothing.model import ClothingClassifierMobileNet, ModelSpec
from clothing.predict import Prediction, mirror_tta, ranked
from clothing.progress import progress

PRECISION = "fp32"  # the exported model's own precision, on every CPU


@dataclass(frozen=True)
class BatchOptions:
    """How `predict_files` runs: top-k, test-time augmentation, and where and in what batches."""

    top_k: int = 3
    tta: bool = False  # average the logits of each image and of its mirror image
    engine: str = "auto"
    device: str = "cpu"
    batch_size: int = 32
    progress: bool = False


@dataclass(frozen=True)
class ImagePrediction:
    """One file's result: its top-k (most likely first), or, when it could not be read, the reason."""

    path: str
    top_k: Prediction
    error: str = ""


def _visible_below(path: Path, root: Path) -> bool:
    return not any(part.startswith(".") for part in path.relative_to(root).parts)


def find_images(paths: Sequence[str | Path]) -> list[str]:
    """The files to predict, in order: each file as given (whatever its name: it was asked for), and
    each folder's image files, recursively and sorted, hidden ones skipped. A folder without images
    is an error: it is almost always the wrong folder."""
    found: list[str] = []
    for path in map(Path, paths):
        if not path.is_dir():
            found.append(str(path))
            continue
        images = sorted(
            p
            for p in path.rglob("*")
            if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() and _visible_below(p, path)
        )
        if not images:
            raise DatasetError(
                f"folder {shown(path)} has no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}); give image "
                "files or folders that hold them"
            )
        found.extend(map(str, images))
    return found


class _DecodedFiles(Dataset):
    """(uint8 pixels (3, H, W), error) per file: zeros and the reason for a file that does not decode."""

    def __init__(self, paths: Sequence[str], spec: ModelSpec) -> None:
        self.paths = paths
        self.pixels, self.mean, self.std = pixel_transform(spec.transform())
        self.shape = (3, spec.image_size, spec.image_size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, str]:
        image, error = try_image(self.paths[idx])
        if image is None:
            return torch.zeros(self.shape, dtype=torch.uint8), str(error)
        return self.pixels(image), ""


def predict_files(
    model: ClothingClassifierMobileNet, spec: ModelSpec, paths: Sequence[str], options: BatchOptions
) -> Iterator[ImagePrediction]:
    """An ImagePrediction for each of `paths` (see find_images), in order, one batch at a time."""
    device = torch.device(options.device)
    files = _DecodedFiles(paths, spec)
    one_batch = len(paths) <= options.batch_size
    # One batch or less, and no engine asked for by name: eager fp32 ("exact"), since tracing torch's
    # fused graph (about 2 s) costs more than it saves there.
    precision = "exact" if one_batch and options.engine != "openvino" else PRECISION
    engine = resolve_engine(options.engine, device, precision, len(paths) * (2 if options.tta else 1))
    extractor = TrunkOutputs(model.features, None, files.mean, files.std)
    trunk = build_trunk(extractor, engine, device, precision, files.shape)
    head = model.head.to(device).eval()
    workers = 0 if one_batch else default_num_workers(device)  # one batch: decode here
    loader = DataLoader(
        files,
        batch_size=options.batch_size,
        num_workers=workers,
        worker_init_fn=yield_to_engine if device.type == "cpu" else None,
    )
    done = 0
    with progress(len(paths), "predict", options.progress) as bar:
        for pixels, errors in loader:

            def logits_of(mirrored: bool, pixels=pixels) -> torch.Tensor:
                # The mirror is the decoded pixels flipped, as in extraction (bit for bit).
                (pooled,) = trunk(pixels.flip(-1) if mirrored else pixels)
                return head(pooled.float().to(device))

            with torch.inference_mode():
                logits = mirror_tta(logits_of) if options.tta else logits_of(False)
            top = ranked(torch.softmax(logits, dim=1).cpu(), spec.classes, options.top_k)
            for path, error, classes in zip(paths[done : done + len(pixels)], errors, top):
                yield ImagePrediction(path, [] if error else classes, error)
            done += len(pixels)
            bar.update(len(pixels))


CSV_COLUMNS = ("path", "label", "probability", "top_k", "error")


def csv_row(result: ImagePrediction) -> dict[str, str]:
    """One CSV row: the most likely label and its probability, and the top-k as a JSON object (label:
    probability, most likely first) that json.loads reads back in order; an unreadable file has only
    its path and error."""
    if result.error:
        return {"path": shown(result.path), "label": "", "probability": "", "top_k": "", "error": result.error}
    label, probability = result.top_k[0]
    top = json.dumps({name: round(p, 4) for name, p in result.top_k}, ensure_ascii=False)
    return {"path": shown(result.path), "label": label, "probability": f"{probability:.4f}", "top_k": top, "error": ""}


def write_predictions(results: Iterable[ImagePrediction], path: Path) -> list[str]:
    """Stream `results` into a CSV file at `path`, row by row (memory stays flat over any number of
    files), renamed into place when complete so an interrupted run leaves no half file under the
    name; returns the errors of the unreadable files."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    errors = []
    try:
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, CSV_COLUMNS)
            writer.writeheader()
            for result in results:
                writer.writerow(csv_row(result))
                if result.error:
                    errors.append(result.error)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return errors
