import numpy as np
import torch
from PIL import Image

from clothing.data import build_transforms
from clothing.model import ClothingClassifierMobileNet, load_backbone
from clothing.predict import mirror_averaged_logits, top_k

CLASSES = ["a", "b", "c"]


def model():
    torch.manual_seed(0)
    return ClothingClassifierMobileNet(num_classes=3, size_inner=8, backbone=load_backbone(None)).eval()


def test_tta_leaves_a_mirror_symmetric_image_unchanged(tmp_path):
    half = np.random.default_rng(0).integers(0, 255, (64, 32, 3), dtype=np.uint8)
    Image.fromarray(np.concatenate([half, half[:, ::-1]], axis=1)).save(tmp_path / "sym.png")
    net, transform = model(), build_transforms()
    plain = top_k(net, [tmp_path / "sym.png"], transform, CLASSES, k=3)
    with_tta = top_k(net, [tmp_path / "sym.png"], transform, CLASSES, k=3, tta=True)
    assert [name for name, _ in plain[0]] == [name for name, _ in with_tta[0]]
    np.testing.assert_allclose([p for _, p in plain[0]], [p for _, p in with_tta[0]], atol=1e-5)


def test_tta_averages_the_logits_of_the_image_and_its_mirror():
    net, images = model(), torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = (net(images) + net(torch.flip(images, dims=[3]))) / 2
        torch.testing.assert_close(mirror_averaged_logits(net, images), expected)
