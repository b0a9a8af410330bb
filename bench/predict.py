"""`python -m bench.predict`: images per second of `sweep predict` over a folder against the course
notebook's per-image loop, on the same model and images (the validation folder). Part of `make bench`.

The notebook classifies one image at a time: open, preprocess, `model(x.unsqueeze(0))`, eager. The
project decodes in loader processes and runs batches on an engine (clothing.inference). A random head
on the real backbone: the speed does not depend on what the head learned, and the labels of the two
paths are compared image by image.
"""

from __future__ import annotations

import copy
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from clothing.data import discover_classes, load_image
from clothing.inference import BatchOptions, find_images, predict_files, write_predictions
from clothing.model import ModelSpec, build_model, load_backbone

Row = tuple[str, str, str]


def notebook_loop(model: torch.nn.Module, spec: ModelSpec, paths: list[str]) -> list[str]:
    """The notebook's prediction: each image alone through the eager model."""
    transform = spec.transform()
    labels = []
    with torch.no_grad():
        for path in paths:
            logits = model(transform(load_image(path)).unsqueeze(0))
            labels.append(spec.classes[int(logits.argmax())])
    return labels


def batched(model: torch.nn.Module, spec: ModelSpec, paths: list[str], engine: str) -> list[str]:
    """What `sweep predict PATH --output predictions.csv` does, in process: batches of 32, CSV written."""
    out = Path(tempfile.mkdtemp(prefix="bench-predict-")) / "predictions.csv"
    options = BatchOptions(engine=engine, device="cpu")
    predictions = list(predict_files(model, spec, paths, options))
    write_predictions(iter(predictions), out)
    return [p.top_k[0][0] for p in predictions]


def predict_rows(data_dir: Path, weights: str) -> list[Row]:
    folder = data_dir / "validation"
    paths = find_images([folder])
    spec = ModelSpec(classes=tuple(discover_classes(data_dir / "train")), size_inner=100)
    torch.manual_seed(0)
    model = build_model(spec, load_backbone(weights)).eval()
    start = time.perf_counter()
    reference = notebook_loop(model, spec, paths)
    t_loop = time.perf_counter() - start
    loop_rate = f"{len(paths) / t_loop:.1f} img/s"
    rows = [(f"predict {len(paths)} validation images, notebook per-image loop", loop_rate, "baseline")]
    for engine in ("auto", "torch", "openvino"):
        start = time.perf_counter()
        labels = batched(copy.deepcopy(model), spec, paths, engine)  # an engine compiles a copy of its own
        seconds = time.perf_counter() - start
        same = sum(a == b for a, b in zip(labels, reference)) / len(paths)
        rows.append(
            (
                f"predict {len(paths)} validation images, sweep predict --engine {engine} (batches of 32)",
                f"{len(paths) / seconds:.1f} img/s",
                f"{t_loop / seconds:.2f}x notebook; labels as the loop's: {100 * same:.1f} %",
            )
        )
    # A larger folder: the engine's set-up (OpenVINO's conversion, about 3-4 s) is paid once for more
    # images. Against the loop's rate above, which does not depend on the folder's size.
    train = find_images([data_dir / "train"])
    start = time.perf_counter()
    batched(copy.deepcopy(model), spec, train, "auto")
    rate = len(train) / (time.perf_counter() - start)
    rows.append(
        (
            f"predict {len(train)} training images, sweep predict --engine auto (batches of 32)",
            f"{rate:.1f} img/s",
            f"{rate * t_loop / len(paths):.2f}x the notebook loop's rate",
        )
    )
    return rows


def main() -> None:
    data_dir, weights = Path(os.environ.get("CLOTHING_DATA_DIR", "")), os.environ.get("CLOTHING_BACKBONE_WEIGHTS")
    if not (data_dir / "validation").is_dir() or not weights:
        sys.exit("Error: set CLOTHING_DATA_DIR and CLOTHING_BACKBONE_WEIGHTS to the real data and weights")
    rows = predict_rows(data_dir, weights)
    print("| figure | value | against baseline |\n| --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
