"""Extraction engines: what runs the frozen trunk over the images, once per cache miss.

torch is the reference and the fallback: eager PyTorch for `--precision exact`, a frozen, fused
TorchScript graph in fp32, bf16 autocast, and the only engine on a GPU. OpenVINO runs the same trunk,
converted from the torch module in memory (about 3 s), in fp32 or bf16 on the CPU: a runtime made for
CPU inference. `python -m bench.extraction` measured it at 1.7x the fused torch graph in fp32 and 2.9x
torch's bf16 autocast in bf16 (2-core AVX-512 + bf16 CPU), features within rounding of eager fp32 in
fp32. The engine is part of the cache key.

Measured and not kept (docs/benchmarks.md, "Speed"): ONNX Runtime (as fast as OpenVINO in fp32, no bf16 on x86,
one more runtime), int8 through NNCF (min cosine 0.986 against exact, under the 0.99 gate, and a
calibration pass per cache miss), torch.compile (slower than the TorchScript graph here, after a minute
of compilation that a one-pass job pays every time).
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Callable

import torch

from clothing.model import weights_fingerprint

ENGINES = ("auto", "torch", "openvino")
# Converting the trunk for OpenVINO costs about 3 s, and saves about 5 ms an image against torch's fused
# graph on 2 cores: "auto" leaves passes shorter than this (image-views) to torch.
OPENVINO_MIN_IMAGES = 1000

Trunk = Callable[[torch.Tensor], tuple[torch.Tensor, ...]]  # images (N, 3, H, W) -> the trunk's outputs


class EngineError(ValueError):
    """The engine asked for cannot run here; the message says which one can."""


def openvino_installed() -> bool:
    return importlib.util.find_spec("openvino") is not None


def engine_runs(engine: str, device: torch.device) -> bool:
    """Whether `engine` can run on `device` here."""
    return engine != "openvino" or (device.type == "cpu" and openvino_installed())


def resolve_engine(engine: str, device: torch.device, precision: str, images: int = OPENVINO_MIN_IMAGES) -> str:
    """The engine that will run a pass over `images` image-views: "auto" picks OpenVINO where it
    applies (the CPU, fp32 or bf16, the package installed, a pass long enough to repay its conversion)
    and torch elsewhere. `precision` must be resolved; "exact" is eager torch by definition, whatever
    the engine."""
    if engine not in ENGINES:
        raise EngineError(f"unknown engine {engine!r}; use one of {', '.join(ENGINES)}")
    if engine == "openvino" and device.type != "cpu":
        raise EngineError(f"--engine openvino runs on the CPU, not on {device.type}; use --engine torch or auto")
    if engine == "openvino" and not openvino_installed():
        raise EngineError("--engine openvino needs the openvino package: pip install openvino, or use --engine torch")
    if precision == "exact" or device.type != "cpu":
        return "torch"
    if engine == "auto":
        return "openvino" if openvino_installed() and images >= OPENVINO_MIN_IMAGES else "torch"
    return engine


def fused_torch_graph(extractor: torch.nn.Module, image_shape: tuple[int, ...]) -> torch.nn.Module:
    """The extractor frozen into a fused inference graph (BatchNorm folded into the convolutions):
    1.6x over eager on a CPU, features equal to eager fp32 up to rounding."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # torch.jit is deprecated; it stays as the torch engine's fp32
        # path (the fallback), and OpenVINO is the fast one.
        # No check_trace: it traces a second time to compare the graphs, 0.5 s of every build, and the
        # trunk has no data-dependent branches (tests/test_features.py holds its features to eager's).
        traced = torch.jit.trace(extractor, torch.zeros(1, *image_shape, dtype=torch.uint8), check_trace=False)
        return torch.jit.optimize_for_inference(traced)


def torch_trunk(extractor: torch.nn.Module, device: torch.device, precision: str, image_shape) -> Trunk:
    extractor = extractor.to(device, memory_format=torch.channels_last).eval()
    if device.type == "cpu" and precision == "fp32":
        extractor = fused_torch_graph(extractor, image_shape)
    return lambda images: extractor(images.to(device, non_blocking=True, memory_format=torch.channels_last))


def openvino_trunk(extractor: torch.nn.Module, precision: str, image_shape: tuple[int, ...]) -> Trunk:
    import openvino as ov

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the conversion traces with torch.jit, which warns it is deprecated
        example = torch.zeros(1, *image_shape, dtype=torch.uint8)
        model = ov.convert_model(extractor.eval(), example_input=example, input=[((-1, 3, -1, -1), ov.Type.u8)])
    # LATENCY: one request on all cores, which is what a batch loop wants; THROUGHPUT's streams halved
    # the rate on 2 cores.
    hint = {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32", "PERFORMANCE_HINT": "LATENCY"}
    request = ov.Core().compile_model(model, "CPU", hint).create_infer_request()

    def run(images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = request.infer({0: images.contiguous().numpy()})
        # The request reuses its output buffers on the next call: copy them out.
        return tuple(torch.from_numpy(outputs[i].copy()) for i in range(len(outputs)))

    return run


_LAST_BUILT: dict[tuple, Trunk] = {}  # the last compiled trunk this process built, by what it computes


def build_trunk(
    extractor: torch.nn.Module, engine: str, device: torch.device, precision: str, image_shape: tuple[int, ...]
) -> Trunk:
    """`extractor` (a module of uint8 images) compiled for `engine` (resolved) in `precision` (resolved).

    A compiled trunk (OpenVINO's, torch's fused fp32 graph: seconds to build) is kept and handed out
    again for the same weights (their names included, so the cut too), engine, precision, device and
    shape: a sweep's validation pass reuses its training pass's trunk instead of converting it again
    (about 3 s for OpenVINO). Eager torch costs nothing to build, and is built each time."""
    compiled = engine == "openvino" or (device.type == "cpu" and precision == "fp32")
    if not compiled:
        return torch_trunk(extractor, device, precision, image_shape)
    key = (weights_fingerprint(extractor), type(extractor).__name__, engine, str(device), precision, tuple(image_shape))
    if key not in _LAST_BUILT:
        _LAST_BUILT.clear()  # one at a time: a compiled trunk holds a copy of the weights
        if engine == "openvino":
            _LAST_BUILT[key] = openvino_trunk(extractor, precision, image_shape)
        else:
            _LAST_BUILT[key] = torch_trunk(extractor, device, precision, image_shape)
    return _LAST_BUILT[key]
