from sweep.cli import cli

cli()
