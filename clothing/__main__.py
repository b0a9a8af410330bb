"""`python -m clothing classify IMAGE...`: ImageNet top-k of a pretrained MobileNetV2."""

from __future__ import annotations

import click

import clothing
from clothing.model import TORCHVISION_WEIGHTS, BackboneError, load_backbone
from clothing.predict import classify_imagenet, prediction_lines, read_images, unreadable_summary


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(version=clothing.__version__, prog_name="clothing")
def cli() -> None:
    """Transfer-learning helpers for image folders (the clothing dataset by default)."""


@cli.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option(
    "--top-k", default=5, show_default=True, type=click.IntRange(min=1), help="How many classes to show per image."
)
@click.option(
    "--backbone-weights",
    envvar="CLOTHING_BACKBONE_WEIGHTS",
    default=TORCHVISION_WEIGHTS,
    show_default=True,
    help="Local MobileNetV2 state_dict, or IMAGENET1K_V1 to download torchvision's (env CLOTHING_BACKBONE_WEIGHTS).",
)
def classify(images: tuple[str, ...], top_k: int, backbone_weights: str) -> None:
    """ImageNet top-k classes of images.

    Prints the top-k ImageNet classes of each IMAGE with their probabilities.
    """
    try:
        backbone = load_backbone(backbone_weights)
    except BackboneError as exc:
        raise click.ClickException(str(exc)) from exc
    readable, unreadable = read_images(images)
    predictions = classify_imagenet(backbone, [image for _, image in readable], top_k)
    for line in prediction_lines([path for path, _ in readable], predictions):
        click.echo(line)
    if unreadable:
        raise click.ClickException(unreadable_summary(unreadable, len(images)))


if __name__ == "__main__":
    cli()
