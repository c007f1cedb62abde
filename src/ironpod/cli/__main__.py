"""``python -m ironpod.cli`` is the ``ironpod`` command (handy before the script is on PATH)."""

from ironpod.cli.main import app

app(prog_name="ironpod")
