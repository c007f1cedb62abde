"""The ``ironpod`` command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ironpod.errors import errors_to_exit

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="ironpod: training foundation models on clusters that fail.",
)


@app.command()
def version() -> None:
    """Print ironpod's version."""
    from ironpod import __version__

    typer.echo(__version__)


@app.command()
def demo(
    steps: Annotated[int, typer.Option(min=2, help="training steps")] = 300,
    crash_at: Annotated[
        int, typer.Option(help="SIGKILL the worker after this step (0: no crash)")
    ] = 170,
    every: Annotated[int, typer.Option(min=1, help="checkpoint every N steps")] = 10,
    config: Annotated[str, typer.Option(help="recipe preset or YAML file")] = "tiny",
    workdir: Annotated[Path, typer.Option(help="where checkpoints go (emptied first)")] = Path(
        "runs/demo"
    ),
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="recipe override KEY=VALUE (repeatable)"),
    ] = None,
) -> None:
    """Pretrain the GPT recipe on the Python standard library, through an injected crash."""
    from ironpod.cli.demo import run_demo

    overrides = ["data.tokenizer=bpe", "data.vocab_size=1024", *(set_ or [])]
    with errors_to_exit():
        code = run_demo(
            config=config,
            steps=steps,
            crash_at=crash_at or None,
            every=every,
            workdir=workdir,
            overrides=overrides,
        )
    raise typer.Exit(code)
