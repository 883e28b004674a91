"""What a run does beside training, plugged into the trainer (online kNN, held-out loss)."""

from __future__ import annotations


class Callback:
    """Every worker calls every hook (a hook may run collectives); `trainer.rank` tells
    rank 0, which writes the run's files."""

    def setup(self, trainer) -> None:
        """Once per attempt, after the method, optimizer and engine are built."""

    def on_step(self, trainer, out: dict, metrics: dict) -> None:
        """After an optimizer step: `out` is the method's outputs of the last micro-batch,
        `metrics` the step's global metrics, to add to (they are logged after the hooks)."""
