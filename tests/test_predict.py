import numpy as np
import torch
from click.testing import CliRunner
from PIL import Image

from bench.images import calibrated_backbone
from clothing.__main__ import cli as clothing_cli
from clothing.data import build_transforms, load_image
from clothing.model import ClothingClassifierMobileNet
from clothing.predict import mirror_tta, top_k

CLASSES = ["a", "b", "c"]


def model():
    torch.manual_seed(0)
    return ClothingClassifierMobileNet(num_classes=3, size_inner=8, backbone=calibrated_backbone()).eval()


def test_tta_leaves_a_mirror_symmetric_image_unchanged(tmp_path):
    half = np.random.default_rng(0).integers(0, 255, (64, 32, 3), dtype=np.uint8)
    Image.fromarray(np.concatenate([half, half[:, ::-1]], axis=1)).save(tmp_path / "sym.png")
    net, transform = model(), build_transforms()
    plain = top_k(net, [load_image(tmp_path / "sym.png")], transform, CLASSES, k=3)
    with_tta = top_k(net, [load_image(tmp_path / "sym.png")], transform, CLASSES, k=3, tta=True)
    assert [name for name, _ in plain[0]] == [name for name, _ in with_tta[0]]
    np.testing.assert_allclose([p for _, p in plain[0]], [p for _, p in with_tta[0]], atol=1e-5)


def test_tta_averages_the_logits_of_the_image_and_its_mirror():
    net, images = model(), torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = (net(images) + net(torch.flip(images, dims=[3]))) / 2
        torch.testing.assert_close(mirror_tta(lambda mirrored: net(images.flip(-1) if mirrored else images)), expected)


def test_tta_changes_the_probabilities_of_an_asymmetric_image(tmp_path):
    pixels = np.zeros((64, 64, 3), dtype=np.uint8)
    pixels[:, :32] = (230, 60, 60)  # bright left half: its mirror is another image
    Image.fromarray(pixels).save(tmp_path / "left.png")
    net, transform = model(), build_transforms()
    plain = dict(top_k(net, [load_image(tmp_path / "left.png")], transform, CLASSES, k=3)[0])
    with_tta = dict(top_k(net, [load_image(tmp_path / "left.png")], transform, CLASSES, k=3, tta=True)[0])
    assert max(abs(plain[c] - with_tta[c]) for c in CLASSES) > 1e-4


def test_classify_prints_k_imagenet_classes_per_image(data_dir, tiny_weights):
    images = [str(data_dir / "train" / "hat" / "00.jpg"), str(data_dir / "train" / "shoes" / "01.jpg")]
    result = CliRunner().invoke(
        clothing_cli, ["classify", *images, "--top-k", "4", "--backbone-weights", str(tiny_weights)]
    )
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == images[0] and lines[5] == images[1]
    assert len(lines) == 10
    probabilities = [float(line.split()[0]) for line in lines[1:5]]
    assert probabilities == sorted(probabilities, reverse=True)


def test_classify_with_a_wrong_weights_file_is_one_error_line(tmp_path, data_dir):
    (tmp_path / "bad.pth").write_text("nope")
    result = CliRunner().invoke(
        clothing_cli,
        ["classify", str(data_dir / "train" / "hat" / "00.jpg"), "--backbone-weights", str(tmp_path / "bad.pth")],
    )
    assert result.exit_code == 1
    assert result.output.startswith("Error: ") and "bad.pth" in result.output
