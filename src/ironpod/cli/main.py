"""The ``ironpod`` command."""

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False)


@app.command()
def version() -> None:
    """Print ironpod's version."""
    from ironpod import __version__

    typer.echo(__version__)
