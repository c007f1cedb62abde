"""The ``ironpod`` command line.

Options before the command apply to all of them: ``ironpod --url URL --token T jobs``
(precedence: flag > ``IRONPOD_URL``/``IRONPOD_TOKEN`` > the local cluster's files under
``IRONPOD_HOME`` > ``http://127.0.0.1:8700``; see :mod:`ironpod.client`).

Every failure ends in one line, ``error: ...``, and an exit code: 2 for input to change
(including a wrong flag), 1 for a failure, 124 for a ``wait --timeout`` that ran out,
130 for Ctrl-C (:mod:`ironpod.cli.common`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.main import get_command

from ironpod import env
from ironpod.cli import chaos, cluster, health, jobs, launch, nodes
from ironpod.cli.common import Globals, cli_errors
from ironpod.errors import errors_to_exit


class _Typer(typer.Typer):
    """Typer, with Click's usage errors (and any unexpected one) as our one-line errors.

    Typer prints usage errors in a box and unexpected exceptions as a rich traceback; a
    command-line tool that scripts call must give one line and a meaningful exit code.
    """

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["standalone_mode"] = False
        try:
            with cli_errors():
                result = get_command(self).main(*args, **kwargs)
        except typer.TyperException as exc:  # Click's usage errors (bad flag, missing argument)
            if type(exc).__name__ == "NoArgsIsHelpError":
                sys.exit(0)  # `ironpod` alone (or `ironpod chaos`): the help is printed; no error
            _error_line(exc.format_message(), exc.exit_code)
        except typer.Abort:
            _error_line("aborted", 1)
        except KeyboardInterrupt:
            sys.exit(130)
        except BrokenPipeError:  # `ironpod logs JOB | head`: the reader is done; so are we
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(0)
        except Exception as exc:  # a bug: still one line, naming the exception's type
            _error_line(f"unexpected {type(exc).__name__}: {exc}", 1)
        sys.exit(result if isinstance(result, int) else 0)


def _error_line(message: str, code: int) -> None:
    print(f"error: {' '.join(message.split())}", file=sys.stderr, flush=True)
    sys.exit(code)


app = _Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="ironpod: training foundation models on clusters that fail.",
)


@app.callback()
def _options(
    ctx: typer.Context,
    url: Annotated[
        str | None, typer.Option(envvar=env.URL, help="controller URL", show_envvar=True)
    ] = None,
    token: Annotated[
        str | None, typer.Option(envvar=env.TOKEN, help="admin bearer token", show_envvar=True)
    ] = None,
) -> None:
    ctx.obj = Globals(url=url, token=token)


@app.command()
def version() -> None:
    """Print ironpod's version."""
    from ironpod import __version__

    typer.echo(__version__)


@app.command()
def demo(
    steps: Annotated[int, typer.Option(min=20, help="training steps")] = 300,
    faults: Annotated[
        str, typer.Option(help="KIND@STEP,... with KIND crash, hang or node; 'none' for none")
    ] = "crash@85,hang@155,node@226",
    every: Annotated[int, typer.Option(min=1, help="durable checkpoint every N steps")] = 10,
    memory_every: Annotated[
        int, typer.Option(min=0, help="in-memory snapshot every N steps (0: durable only)")
    ] = 1,
    config: Annotated[str, typer.Option(help="recipe preset or YAML file")] = "tiny",
    workdir: Annotated[Path, typer.Option(help="cluster and checkpoints (emptied first)")] = Path(
        "runs/demo"
    ),
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="recipe override KEY=VALUE (repeatable)"),
    ] = None,
) -> None:
    """A local cluster pretrains the GPT recipe through a crash, a hang and a lost node."""
    from ironpod.cli.demo import run_demo

    overrides = [
        "data.tokenizer=bpe",
        "data.vocab_size=1024",
        f"checkpoint.memory_every={memory_every}",
        *(set_ or []),
    ]
    with errors_to_exit():
        code = run_demo(
            config=config,
            steps=steps,
            faults=faults,
            every=every,
            workdir=workdir,
            overrides=overrides,
        )
    raise typer.Exit(code)


for _module in (cluster, nodes, health, jobs, chaos, launch):
    _module.register(app)
