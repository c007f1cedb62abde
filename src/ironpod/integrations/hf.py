"""Hugging Face ``transformers.Trainer``: SIGTERM saves a checkpoint at the current step, stops.

    from ironpod.integrations.hf import IronpodCallback
    trainer = Trainer(..., callbacks=[IronpodCallback()])
    trainer.train(resume_from_checkpoint=bool(get_last_checkpoint(args.output_dir)))

At the end of the step during which SIGTERM arrived (on any rank), every rank sets
``control.should_save`` and ``control.should_training_stop``: the Trainer writes
``checkpoint-<step>`` as it does for ``save_steps``, and ``train()`` returns. Then the process
exits with EXIT_PREEMPTED (``exit_on_stop``), so the code after ``train()`` does not mistake a
preempted run for a finished one, and the controller restarts the job without counting a
failure. Each step is reported as ironpod progress with the Trainer's global step, so the
numbers continue across a resume (the step hook would count from 0 in every process).

transformers loads when ``IronpodCallback`` is first looked up (PEP 562), not with this module.
"""

from __future__ import annotations

from typing import Any

from ironpod.integrations import EXIT_PREEMPTED, StopRequest

__all__ = ["IronpodCallback"]  # noqa: F822 (built on first lookup, see __getattr__)

_built: dict[str, type] = {}


def _build() -> type:
    try:
        from transformers import TrainerCallback
    except ImportError as exc:
        raise ImportError(
            "ironpod.integrations.hf needs transformers (pip install 'ironpod[compat]')"
        ) from exc

    class IronpodCallback(TrainerCallback):
        """SIGTERM -> save at this step on every rank -> stop -> exit EXIT_PREEMPTED."""

        def __init__(self, *, exit_on_stop: bool = True, report_progress: bool = True) -> None:
            self.stop = StopRequest()
            self.exit_on_stop = exit_on_stop
            self.report_progress = report_progress
            self.stopped_at: int | None = None

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.stop.install()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            if self.report_progress:
                from ironpod.train import progress

                progress(int(state.global_step))
            if self.stop.agreed():
                control.should_save = True
                control.should_training_stop = True
                self.stopped_at = int(state.global_step)
            return control

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.stop.uninstall()
            if self.stopped_at is not None and self.exit_on_stop:
                raise SystemExit(EXIT_PREEMPTED)

    return IronpodCallback


def __getattr__(name: str) -> Any:
    if name == "IronpodCallback":
        if name not in _built:
            _built[name] = _build()
        return _built[name]
    raise AttributeError(f"module 'ironpod.integrations.hf' has no attribute {name!r}")
