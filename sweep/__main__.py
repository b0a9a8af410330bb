from sweep.cli import cli

if __name__ == "__main__":  # `--jobs` workers are spawned processes: they must not run the CLI again
    cli()
