"""`python -m bench.extraction`: where an extraction pass spends its time, engine by engine and step by
step of the decoding, each measured in this run on the real validation images.

Engines run the trunk alone over images already decoded (uint8, in memory), so the rows compare the
engines, not the loader. Every row's features are compared with eager fp32 (`--precision exact`), the
reference: the quality gate is min cosine >= 0.99. Rows for packages that are not installed
(onnxruntime, nncf: `pip install onnxruntime nncf`) are skipped and say so.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
import time
import warnings
from pathlib import Path

import click
import numpy as np
import torch
from PIL import Image
from torchvision.io import decode_jpeg, read_file
from torchvision.transforms import functional as F

from clothing.data import ClothingDataset, build_transforms, load_image, pixel_transform
from clothing.engines import build_trunk
from clothing.extract import TrunkOutputs, native_bf16_cpu
from clothing.model import load_backbone

BATCH = 32
Row = tuple[str, str, str]


def _throughput(run, batches: list[torch.Tensor]) -> tuple[torch.Tensor, float]:
    """(pooled features of every batch, images per second), after one warm-up batch."""
    run(batches[0])
    start = time.perf_counter()
    outputs = [run(batch)[-1].float() for batch in batches]
    return torch.cat(outputs), sum(map(len, batches)) / (time.perf_counter() - start)


def _row(name: str, features: torch.Tensor, rate: float, reference: torch.Tensor, note: str = "") -> Row:
    cosine = torch.nn.functional.cosine_similarity(features, reference, dim=1).min().item()
    return name, f"{rate:.1f} img/s", f"min cosine {cosine:.5f}{note}"


def engine_rows(extractor: TrunkOutputs, batches: list[torch.Tensor], calibration: list[torch.Tensor]) -> list[Row]:
    shape = tuple(batches[0].shape[1:])
    cpu = torch.device("cpu")
    with torch.inference_mode():
        reference, rate = _throughput(extractor, batches)
    rows = [("torch, eager fp32 (exact, the reference)", f"{rate:.1f} img/s", "")]
    engines = [("torch, fused TorchScript graph, fp32", "torch", "fp32"), ("openvino, fp32", "openvino", "fp32")]
    if native_bf16_cpu():
        engines += [("torch, bf16 autocast", "torch", "bf16"), ("openvino, bf16", "openvino", "bf16")]
    for name, engine, precision in engines:
        trunk = build_trunk(extractor, engine, cpu, precision, shape)
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=engine == "torch" and precision == "bf16")
        with torch.inference_mode(), autocast:
            rows.append(_row(name, *_throughput(trunk, batches), reference))
    rows.append(torch_compile_row(extractor, batches, reference))
    rows.append(onnxruntime_row(extractor, batches, reference))
    rows.append(int8_row(extractor, batches, calibration, reference))
    return rows


def torch_compile_row(extractor: TrunkOutputs, batches: list[torch.Tensor], reference: torch.Tensor) -> Row:
    """torch.compile (Inductor, the replacement for torch.jit): the fused graph's successor, timed with
    its compilation, which a one-pass job pays every time."""
    start = time.perf_counter()
    compiled = torch.compile(extractor.eval(), dynamic=False)
    with torch.inference_mode():
        compiled(batches[0])
        compiled(batches[-1])  # the last, smaller batch compiles a second graph
        seconds = time.perf_counter() - start
        features, rate = _throughput(compiled, batches)
    return _row("torch.compile (inductor), fp32", features, rate, reference, f"; compiling took {seconds:.0f} s")


def onnxruntime_row(extractor: TrunkOutputs, batches: list[torch.Tensor], reference: torch.Tensor) -> Row:
    name = "onnxruntime, fp32"
    if importlib.util.find_spec("onnxruntime") is None:
        return name, "-", "not installed (pip install onnxruntime onnx)"
    import onnxruntime

    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = Path(folder) / "trunk.onnx"
        torch.onnx.export(
            extractor.eval(), (batches[0][:1],), str(path), input_names=["images"], dynamo=False,
            dynamic_axes={"images": {0: "n"}},
        )  # fmt: skip
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    run = lambda images: [torch.from_numpy(out) for out in session.run(None, {"images": images.numpy()})]  # noqa: E731
    return _row(name, *_throughput(run, batches), reference)


def int8_row(
    extractor: TrunkOutputs, batches: list[torch.Tensor], calibration: list[torch.Tensor], reference: torch.Tensor
) -> Row:
    """OpenVINO int8, quantized by NNCF with training images as the calibration set."""
    name = "openvino, int8 (NNCF, 320 training images)"
    if importlib.util.find_spec("nncf") is None:
        return name, "-", "not installed (pip install nncf)"
    import nncf
    import openvino as ov

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = ov.convert_model(extractor.eval(), example_input=batches[0][:1])
        start = time.perf_counter()
        quantized = nncf.quantize(model, nncf.Dataset([b.numpy() for b in calibration]), subset_size=320)
        seconds = time.perf_counter() - start
    request = ov.Core().compile_model(quantized, "CPU", {"PERFORMANCE_HINT": "LATENCY"}).create_infer_request()
    run = lambda images: [torch.from_numpy(request.infer({0: images.numpy()})[0].copy())]  # noqa: E731
    return _row(name, *_throughput(run, batches), reference, f"; quantizing took {seconds:.0f} s")


def decode_rows(paths: list[str], extractor: TrunkOutputs) -> list[Row]:
    """Milliseconds per image of each way to get from a JPEG file to the trunk's input, on one core,
    and what the reduced-size decode does to the features."""
    torch.set_num_threads(1)
    float_path, mirror = build_transforms(), build_transforms(mirror=True)
    uint8_path = pixel_transform(float_path)[0]

    def draft(path: str) -> Image.Image:  # DCT-domain downscaling to half size while decoding
        with Image.open(path) as image:
            image.draft("RGB", (image.size[0] // 2, image.size[1] // 2))
            return image.convert("RGB")

    def draft_to_input(path: str) -> Image.Image:  # the smallest DCT scale that leaves >= 224 x 224
        with Image.open(path) as image:
            image.draft("RGB", (224, 224))
            return image.convert("RGB")

    def reducing_gap(path: str) -> torch.Tensor:  # Pillow's two-step resize: reduce() by an integer, then resample
        image = load_image(path).resize((224, 224), Image.Resampling.BILINEAR, reducing_gap=2.0)
        return F.pil_to_tensor(image)

    def tv_decode(path: str) -> torch.Tensor:
        return F.resize(decode_jpeg(read_file(path)), [224, 224], antialias=True)

    ways = {
        "decode: PIL, Resize, ToTensor, Normalize (before)": lambda p: float_path(load_image(p)),
        "decode: PIL, Resize, uint8 (now; normalised in the trunk)": lambda p: uint8_path(load_image(p)),
        "decode: 2 views, each resized (before)": lambda p: [float_path(im := load_image(p)), mirror(im)],
        "decode: 2 views, view 1 = view 0 flipped (now)": lambda p: [x := uint8_path(load_image(p)), x.flip(-1)],
        "decode: torchvision.io.decode_jpeg, resize": tv_decode,
        "decode: PIL draft(1/2), Resize, uint8": lambda p: uint8_path(draft(p)),
        "decode: PIL draft() to the smallest scale >= 224 px, Resize, uint8": lambda p: uint8_path(draft_to_input(p)),
        "decode: PIL, resize(reducing_gap=2.0), uint8": reducing_gap,
    }
    rows, outputs = [], {}
    for name, way in ways.items():
        way(paths[0])
        start = time.perf_counter()
        outputs[name] = [way(p) for p in paths]
        rows.append((name, f"{(time.perf_counter() - start) / len(paths) * 1000:.2f} ms/img", ""))
    torch.set_num_threads(os.cpu_count() or 1)
    full = torch.stack(outputs["decode: PIL, Resize, uint8 (now; normalised in the trunk)"])
    with torch.inference_mode():
        for index in (4, 5, 6, 7):  # the ways that may give other pixels
            other = torch.stack(outputs[rows[index][0]])
            cosine = torch.nn.functional.cosine_similarity(extractor(full)[-1], extractor(other)[-1], dim=1)
            changed = (other != full).flatten(1).any(dim=1).float().mean().item()
            note = f"min cosine {cosine.min().item():.5f} vs PIL; pixels differ for {100 * changed:.0f} % of images"
            rows[index] = (*rows[index][:2], note)
    return rows


def extraction_rows(data_dir: Path, backbone: torch.nn.Module) -> list[Row]:
    train = ClothingDataset(data_dir / "train", build_transforms())
    val = ClothingDataset(data_dir / "validation", build_transforms(), train.class_to_idx)
    pixels = pixel_transform(build_transforms())[0]
    images = torch.stack([pixels(load_image(p)) for p in val.image_paths])
    picks = np.random.default_rng(0).choice(len(train), min(320, len(train)), replace=False)
    calibration = torch.stack([pixels(load_image(train.image_paths[i])) for i in picks]).split(BATCH)
    extractor = TrunkOutputs(backbone.features).eval()
    return engine_rows(extractor, list(images.split(BATCH)), list(calibration)) + decode_rows(
        val.image_paths[:200], extractor
    )


@click.command()
def main() -> None:
    data_dir, weights = Path(os.environ.get("CLOTHING_DATA_DIR", "")), os.environ.get("CLOTHING_BACKBONE_WEIGHTS")
    if not (data_dir / "validation").is_dir() or not weights:
        raise click.ClickException("set CLOTHING_DATA_DIR and CLOTHING_BACKBONE_WEIGHTS to the real data and weights")
    rows = extraction_rows(data_dir, load_backbone(weights))
    for name, value, note in rows:
        print(f"| {name} | {value} | {note} |")


if __name__ == "__main__":
    main()
