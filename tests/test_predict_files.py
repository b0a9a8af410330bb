"""`sweep predict` over files and folders: one CSV row per image, batched, unreadable files listed."""

import csv
import fcntl
import json
import os
import shutil
import struct
import subprocess
import sys
import termios

import pytest
import torch
from click.testing import CliRunner
from sweep_helpers import assert_one_error

from bench.images import write_hostile_file, write_image
from clothing.checkpoint import spec_of
from clothing.data import load_image
from clothing.predict import mirror_tta
from sweep.cli import cli


def predict(*argv):
    return CliRunner().invoke(cli, ["predict", *map(str, argv)])


def read_rows(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture
def photos(swept, tmp_path):
    """A folder as users have them: images in nested folders, a hidden one, a text file, a broken JPEG."""
    root = tmp_path / "photos"
    shutil.copytree(swept.data_dir / "validation", root / "holiday")
    write_image(root / "loose.png", seed=3, size=50, mode="RGBA")
    write_image(root / ".thumbnails" / "hidden.jpg", seed=4)
    (root / "notes.txt").write_text("not an image")
    write_hostile_file(root / "zz-broken.jpg", "truncated jpeg")
    return root


def test_predict_over_a_folder_writes_one_sorted_row_per_image(photos, exported, tmp_path):
    out = tmp_path / "predictions.csv"
    result = predict(exported.path, photos, "--output", out, "--batch-size", 5)
    assert result.exit_code == 0, result.output
    rows = read_rows(out)
    expected = sorted(p for p in photos.rglob("*") if p.suffix in (".jpg", ".png") and ".thumbnails" not in p.parts)
    assert [r["path"] for r in rows] == [str(p) for p in expected]
    assert list(rows[0]) == ["path", "label", "probability", "top_k", "error"]

    *good, broken = rows
    assert broken["path"].endswith("zz-broken.jpg") and broken["label"] == "" and "cannot read image" in broken["error"]
    assert f"1 of {len(rows)} files could not be read" in result.stderr
    classes = spec_of(exported.payload).classes
    for row in good:
        top = json.loads(row["top_k"])
        assert list(top)[0] == row["label"] and row["label"] in classes and row["error"] == ""
        assert len(top) == 3 and float(row["probability"]) == pytest.approx(top[row["label"]], abs=1e-4)

    # The labels are the exported model's own, computed image by image.
    transform = spec_of(exported.payload).transform()
    with torch.no_grad():
        one_by_one = [classes[exported.model(transform(load_image(r["path"]))[None]).argmax()] for r in good]
    assert [r["label"] for r in good] == one_by_one


def test_batches_engines_and_mirror_views_change_no_label(photos, exported, tmp_path):
    folder = photos / "holiday"

    def labels(*options):
        out = tmp_path / "p.csv"
        assert predict(exported.path, folder, "--output", out, *options).exit_code == 0
        return [(r["label"], float(r["probability"])) for r in read_rows(out)]

    reference = labels("--batch-size", 1, "--engine", "torch")
    for options in (("--batch-size", 7), ("--engine", "openvino", "--batch-size", 32)):
        got = labels(*options)
        assert [label for label, _ in got] == [label for label, _ in reference]
        assert [p for _, p in got] == pytest.approx([p for _, p in reference], abs=1e-3)

    # --tta: the mean of the logits of each image and of its mirror, as the exported model computes it.
    with_tta = labels("--tta", "--batch-size", 4)
    spec, paths = spec_of(exported.payload), sorted(map(str, folder.rglob("*.jpg")))
    batch = torch.stack([spec.transform()(load_image(p)) for p in paths])
    with torch.no_grad():
        probs = torch.softmax(mirror_tta(lambda mirrored: exported.model(batch.flip(-1) if mirrored else batch)), 1)
    assert [label for label, _ in with_tta] == [spec.classes[i] for i in probs.argmax(1)]
    assert [p for _, p in with_tta] == pytest.approx(probs.max(1).values.tolist(), abs=1e-3)


def test_predict_prints_without_output_and_fails_on_unreadable_files(photos, exported):
    result = predict(exported.path, photos / "loose.png", photos / "zz-broken.jpg")
    assert result.exit_code == 1
    assert result.stdout.splitlines()[0] == str(photos / "loose.png") and len(result.stdout.splitlines()) == 4
    assert "cannot read image" in result.stderr and "zz-broken.jpg" in result.stderr


def test_predict_refuses_an_empty_folder_and_a_missing_output_folder(exported, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images")
    assert_one_error(predict(exported.path, tmp_path / "empty"), "has no image files")
    image = write_image(tmp_path / "a.jpg")
    result = predict(exported.path, image, "--output", tmp_path / "missing" / "p.csv")
    assert_one_error(result, "for --output does not exist")
    assert not (tmp_path / "missing").exists()


def terminal() -> tuple[int, int]:
    """A pseudo-terminal of 120 columns (master, slave): what a user's stderr is."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    return master, slave


def read_all(fd: int) -> str:
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # the other end is closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


@pytest.mark.slow  # a fresh process on a pseudo-terminal
def test_predict_to_a_csv_shows_a_progress_bar_on_a_terminal_only(photos, exported, tmp_path):
    out = tmp_path / "p.csv"
    argv = [sys.executable, "-m", "sweep", "predict", str(exported.path), str(photos / "holiday"), "--output", str(out)]
    master, slave = terminal()
    process = subprocess.run(argv, stderr=slave, stdout=subprocess.PIPE, timeout=300)
    os.close(slave)
    on_terminal = read_all(master)
    os.close(master)
    assert process.returncode == 0, on_terminal
    assert "predict: 100%" in on_terminal and "img/s" in on_terminal
    piped = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert piped.returncode == 0 and "img/s" not in piped.stderr and "%|" not in piped.stderr, piped.stderr
    assert piped.stdout == f"Wrote {len(read_rows(out))} predictions to {out}\n"
