"""PyTorch Lightning: SIGTERM saves a checkpoint at the current step, then stops the fit.

    from ironpod.integrations.lightning import IronpodCallback
    trainer = L.Trainer(..., callbacks=[ModelCheckpoint(dirpath=d, ...), IronpodCallback(d)])
    trainer.fit(model, loader, ckpt_path="last")

After the batch during which SIGTERM arrived (on any rank), every rank writes
``<dirpath>/last.ckpt`` with ``trainer.save_checkpoint`` (a collective call in Lightning, so
all ranks make it) and sets ``trainer.should_stop``; when ``fit`` returns, the process exits
with EXIT_PREEMPTED (``exit_on_stop``). ``ckpt_path="last"`` finds that file on the rerun.
Lightning's own SIGTERM handler is replaced while the fit runs: Lightning 2.6's broadcasts from
inside the signal handler, then ends the fit with ``SIGTERMException``, a ``SystemExit`` with
code 0, and no checkpoint: a supervisor would take the preempted run for a finished one.

lightning loads when ``IronpodCallback`` is first looked up (PEP 562), not with this module;
``lightning`` is tried first, then the older ``pytorch_lightning`` package name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ironpod.integrations import EXIT_PREEMPTED, StopRequest

__all__ = ["IronpodCallback"]  # noqa: F822 (built on first lookup, see __getattr__)

_built: dict[str, type] = {}


def _callback_base() -> type:
    import importlib

    for name in ("lightning.pytorch", "pytorch_lightning"):
        try:
            return importlib.import_module(name).Callback  # type: ignore[no-any-return]
        except ImportError:
            continue
    raise ImportError(
        "ironpod.integrations.lightning needs lightning (pip install 'ironpod[compat]')"
    )


def _build() -> type:
    base = _callback_base()

    class IronpodCallback(base):  # type: ignore[misc,valid-type]
        """SIGTERM -> ``last.ckpt`` at this step on every rank -> stop -> exit EXIT_PREEMPTED."""

        def __init__(
            self, dirpath: str | Path, *, exit_on_stop: bool = True, report_progress: bool = True
        ) -> None:
            super().__init__()
            self.path = Path(dirpath) / "last.ckpt"
            self.stop = StopRequest()
            self.exit_on_stop = exit_on_stop
            self.report_progress = report_progress
            self.stopped_at: int | None = None

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            self.stop.install(chain=False)  # after Lightning registered its own at fit start

        def on_train_batch_end(
            self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
        ) -> None:
            step = int(trainer.global_step)
            if self.report_progress:
                from ironpod.train import progress

                loss: Any = outputs.get("loss") if isinstance(outputs, dict) else outputs
                if hasattr(loss, "detach"):
                    progress(step, loss=float(loss.detach()))
                else:
                    progress(step)
            if self.stopped_at is None and self.stop.agreed():
                if trainer.is_global_zero and self.path.is_symlink():
                    self.path.unlink()  # save_last="link": write a file, not through the link
                trainer.save_checkpoint(str(self.path))
                trainer.should_stop = True
                self.stopped_at = step

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            self.stop.uninstall()

        def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
            if self.stopped_at is not None and self.exit_on_stop:
                raise SystemExit(EXIT_PREEMPTED)

    return IronpodCallback


def __getattr__(name: str) -> Any:
    if name == "IronpodCallback":
        if name not in _built:
            _built[name] = _build()
        return _built[name]
    raise AttributeError(f"module 'ironpod.integrations.lightning' has no attribute {name!r}")
