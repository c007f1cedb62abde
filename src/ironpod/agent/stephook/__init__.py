"""The step hook: a progress beacon per optimizer step from scripts that never import ironpod.

The agent puts this directory first on each worker's ``PYTHONPATH`` (:func:`pythonpath`), so
the interpreter runs its ``sitecustomize.py`` at start-up. That module does nothing costly
there: it adds an import finder that waits for ``torch.optim.optimizer`` and, once torch has
loaded it, registers torch's global optimizer step post hook, which sends one beacon per step to
the agent's socket. A ``python -c`` one-liner or a non-torch command pays for a few lines of
Python, not for torch. The module is self-contained (it imports nothing of ironpod): the worker
may run another interpreter, with another environment, than the agent's.

What counts as a step, how it stands down for scripts that report their own progress with
``ironpod.train``, and how it chains to a user's own ``sitecustomize``: see that module.
``IRONPOD_STEP_HOOK=0`` (:data:`ironpod.env.STEP_HOOK`) turns it off.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from ironpod import env

#: The directory the agent adds to the workers' PYTHONPATH: it holds ``sitecustomize.py``.
DIRECTORY = str(Path(__file__).resolve().parent)
PYTHONPATH = "PYTHONPATH"


def enabled(environ: Mapping[str, str]) -> bool:
    """The hook is on unless ``IRONPOD_STEP_HOOK`` is ``0`` (or ``false``/``off``/``no``)."""
    return environ.get(env.STEP_HOOK, "1").strip().lower() not in {"0", "false", "off", "no"}


def pythonpath(current: str | None) -> str:
    """``current`` (a PYTHONPATH value, maybe empty) with the hook's directory first, once."""
    parts = [p for p in (current or "").split(os.pathsep) if p and p != DIRECTORY]
    return os.pathsep.join([DIRECTORY, *parts])
