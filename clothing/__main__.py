"""`python -m clothing classify IMAGE...`: ImageNet top-k of a pretrained MobileNetV2."""

from __future__ import annotations

import click

from clothing.data import DatasetError
from clothing.model import TORCHVISION_WEIGHTS, BackboneError, load_backbone
from clothing.predict import classify_imagenet


@click.group()
def cli() -> None:
    """Transfer-learning helpers for the clothing dataset."""


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
    """Print the top-k ImageNet classes of each IMAGE with their probabilities."""
    try:
        predictions = classify_imagenet(load_backbone(backbone_weights), images, top_k)
    except (BackboneError, DatasetError) as exc:
        raise click.ClickException(str(exc)) from exc
    for path, preds in zip(images, predictions):
        click.echo(path)
        for name, prob in preds:
            click.echo(f"  {prob:6.3f}  {name}")


if __name__ == "__main__":
    cli()
