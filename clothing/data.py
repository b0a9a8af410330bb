"""Class discovery, the ClothingDataset, and the one transform factory.

Discovery is deterministic (sorted, hidden files skipped) and fails loudly with a message that says
which layout is expected, because a silently shifted label is the worst bug a classifier can have.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO

import torch
from PIL import Image
from torchvision import transforms

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SIZE = 224
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})

EXPECTED_LAYOUT = "expected one sub-folder per class with images inside, e.g. train/pants/xxx.jpg"


class DatasetError(ValueError):
    """The data on disk is not usable as it is; the message says what to fix."""


def shown(path: str | Path) -> str:
    """`path` as text that can always be printed and logged. A name that is not valid UTF-8 (common
    after unzipping old archives) reaches Python with surrogate escapes, which no UTF-8 stream, MLflow
    param or JSON file accepts; its odd bytes are shown as \\xNN instead."""
    return str(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def discover_classes(root: str | Path) -> list[str]:
    """Sorted class names: the visible sub-folders of `root`."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"data folder {shown(root)} does not exist ({EXPECTED_LAYOUT})")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and _visible(p))
    if not classes:
        raise DatasetError(f"{shown(root)} has no class folders ({EXPECTED_LAYOUT})")
    return classes


def list_images(folder: Path) -> list[Path]:
    """Sorted image files of one class folder; hidden files and other extensions are skipped."""
    return sorted(p for p in folder.iterdir() if p.is_file() and _visible(p) and p.suffix.lower() in IMAGE_EXTENSIONS)


def load_image(path: str | Path | BinaryIO) -> Image.Image:
    """Open an image fully and convert it to RGB (grayscale, CMYK, RGBA and palette images too).

    One rule: whatever Pillow raises while opening, decoding or converting the file (its safety limit
    against decompression bombs included, which stays as it is), the image is unreadable, and the
    error names the file."""
    try:
        with Image.open(path) as img:
            img.load()  # decode now so a truncated file fails here, naming the file
            return img.convert("RGB")
    except Exception as exc:  # noqa: BLE001 - Pillow's errors have no common base; all mean "unreadable"
        reason = f"{type(exc).__name__}: {exc}" if isinstance(exc, Image.DecompressionBombError) else str(exc)
        raise DatasetError(f"cannot read image {shown(path)}: {reason}; delete or replace the file") from exc


def try_image(source: str | Path | BinaryIO) -> tuple[Image.Image | None, DatasetError | None]:
    """(the image, None), or (None, why) for a file that does not decode: the bad-file rule of every
    pass over many images (extraction, predict, the served model), where one bad file costs only its
    own result."""
    try:
        return load_image(source), None
    except DatasetError as exc:
        return None, exc


def build_transforms(
    image_size: int = IMAGE_SIZE,
    train: bool = False,
    mirror: bool = False,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Callable:
    """The one transform factory: the notebook's preprocessing; `train=True` adds the course's light
    augmentation, `mirror=True` flips every image (the second view of test-time augmentation)."""
    if train:
        steps = [
            transforms.RandomRotation(10),
            transforms.RandomResizedCrop(image_size, scale=(0.9, 1.0)),
            transforms.RandomHorizontalFlip(),
        ]
    else:
        steps = [transforms.Resize((image_size, image_size))]
    if mirror:
        steps.append(transforms.RandomHorizontalFlip(p=1.0))
    return transforms.Compose([*steps, transforms.ToTensor(), transforms.Normalize(mean, std)])


def view_transforms(base: Callable, image_size: int, views: int) -> list[Callable]:
    """The transforms of cached views 0..V-1: `base` (the split's own), its mirror, then the course's
    augmentation."""
    if views < 1:
        raise ValueError(f"views must be at least 1, got {views}")
    extra = [build_transforms(image_size, mirror=True)] + [build_transforms(image_size, train=True)] * (views - 2)
    return [base, *extra[: views - 1]]


def pixel_transform(transform: Callable) -> tuple[Callable, tuple[float, ...], tuple[float, ...]]:
    """One of build_transforms' pipelines split in two: its steps up to uint8 pixels, and the mean and
    std of its closing ToTensor + Normalize, which extraction runs batched inside the trunk instead (the
    same arithmetic, bit for bit). The loader process then does less work and sends 4x fewer bytes."""
    steps = getattr(transform, "transforms", [])
    ends_as_built = len(steps) >= 2 and isinstance(steps[-2], transforms.ToTensor)
    if not ends_as_built or not isinstance(steps[-1], transforms.Normalize):
        raise ValueError("extraction needs a transform from build_transforms (ending in ToTensor, Normalize)")
    normalize = steps[-1]
    return transforms.Compose([*steps[:-2], transforms.PILToTensor()]), tuple(normalize.mean), tuple(normalize.std)


class ClothingDataset(torch.utils.data.Dataset):
    """Images in `root/<class>/<file>`, labelled by the train split's class mapping.

    Pass the train split's `class_to_idx` when reading any other split: a class missing from that
    split then keeps every other label where it was, and a class the train split lacks is an error.
    """

    def __init__(
        self,
        root: str | Path,
        transform: Callable | None = None,
        class_to_idx: dict[str, int] | None = None,
        skip: Sequence[str | Path] = (),
    ) -> None:
        self.root = Path(root)
        self.transform = transform
        folders = discover_classes(self.root)
        if class_to_idx is None:
            class_to_idx = {name: i for i, name in enumerate(folders)}
        unknown = [name for name in folders if name not in class_to_idx]
        if unknown:
            raise DatasetError(
                f"{shown(self.root)} has class folder(s) {', '.join(map(shown, unknown))} that the training split "
                "does not have; add them to train/ or remove them"
            )
        self.class_to_idx = dict(class_to_idx)
        self.classes = sorted(self.class_to_idx, key=self.class_to_idx.__getitem__)
        skipped = {str(p) for p in skip}
        self.image_paths: list[str] = []
        self.labels: list[int] = []
        for name in folders:
            images = list_images(self.root / name)
            if not images:
                raise DatasetError(f"class folder {shown(self.root / name)} has no images ({EXPECTED_LAYOUT})")
            for path in images:
                if str(path) not in skipped:
                    self.image_paths.append(str(path))
                    self.labels.append(self.class_to_idx[name])

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, int]:
        image = load_image(self.image_paths[idx])
        if self.transform is not None:
            image = self.transform(image)
        return image, self.labels[idx]


def build_imagenet_transforms(image_size: int = IMAGE_SIZE) -> Callable:
    """ImageNet's own evaluation preprocessing (resize 256, centre crop 224), for `classify`."""
    return transforms.Compose(
        [
            transforms.Resize(round(image_size * 256 / 224)),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
