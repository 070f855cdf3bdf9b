"""Skipping optimizer steps whose loss or gradients are not finite, and stopping after a run
of them (used by :class:`raykd.roles.learner.Learner`).

At the accumulation boundary the learner asks every rank whether its losses and the
gradients it holds are finite (:func:`any_rank`, so all ranks decide alike), and if not steps
DeepSpeed with a :class:`GuardedAdamW` told to skip and the learning-rate schedule detached:
weights, Adam moments and step count, and the schedule stay bit-identical, and the gradients
are zeroed as after any step. Under ZeRO the optimizer wrapper's own overflow check (a
non-finite gradient norm) skips the same way and the learner reads it back. A
:class:`StepGuard` counts the skipped steps in a row, logs each one as a warning, and after
``max_bad_steps`` of them raises :class:`NonFiniteTrainingError` naming the last good checkpoint.
"""

from __future__ import annotations

import logging

import torch

_LOG = logging.getLogger("raykd.learner")


class NonFiniteTrainingError(RuntimeError):
    """Too many consecutive optimizer steps had a non-finite loss or gradient; the message
    says which steps and where the last good checkpoint is."""


class GuardedAdamW(torch.optim.AdamW):
    """AdamW that leaves the weights and its state untouched while :attr:`skip` is set.

    Without ZeRO, DeepSpeed reads :attr:`overflow` after the step: it then counts a skipped
    step (``engine.skipped_steps``) and reports ``was_step_applied() == False``."""

    skip = False

    @property
    def overflow(self) -> bool:
        return self.skip

    def step(self, closure=None):
        if self.skip:
            return None
        return super().step(closure)


def local_grad_norm(module: torch.nn.Module) -> float | None:
    """L2 norm of the gradients held in ``.grad`` of ``module`` (inf or NaN when one is not
    finite), None when it holds none. Without ZeRO these are all of them, already all-reduced;
    under ZeRO they sit in the optimizer's partitions, which its own overflow check covers."""
    grads = [p.grad.detach().float() for p in module.parameters() if p.grad is not None]
    if not grads:
        return None
    return float(
        torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    )


def any_rank(flag: bool, device) -> bool:
    """``flag`` OR-ed over the ranks of the default process group (itself when there is none)."""
    import torch.distributed as dist

    value = torch.tensor([float(flag)], device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def held_step(engine, optimizer: GuardedAdamW, hold: bool) -> None:
    """``engine.step()``; with ``hold`` the optimizer does nothing and the learning-rate
    schedule is not advanced."""
    scheduler = engine.lr_scheduler
    optimizer.skip = hold
    if hold:
        engine.lr_scheduler = None
    try:
        engine.step()
    finally:
        optimizer.skip = False
        engine.lr_scheduler = scheduler


class StepGuard:
    """Counts consecutive skipped steps; remembers the last checkpoint saved or loaded."""

    def __init__(self, max_bad_steps: int = 3, rank: int = 0):
        if max_bad_steps < 1:
            raise ValueError(f"learner.max_bad_steps must be >= 1, got {max_bad_steps}")
        self.max_bad_steps, self.rank = max_bad_steps, rank
        self.bad_steps = 0
        self.last_checkpoint: tuple[str, int] | None = None  # (directory, step)

    def record(self, step: int, skipped: bool, metrics: dict[str, float]) -> None:
        """After step ``step`` (1-based): reset the count, or log the skipped step (rank 0)
        and raise :class:`NonFiniteTrainingError` when it is the ``max_bad_steps``-th in a row."""
        if not skipped:
            self.bad_steps = 0
            return
        self.bad_steps += 1
        what = f"rank {self.rank}: loss {metrics.get('loss')}, grad norm {metrics.get('grad_norm')}"
        if self.rank == 0:
            _LOG.warning(skipped_message(step, what, self.bad_steps, self.max_bad_steps))
        if self.bad_steps >= self.max_bad_steps:
            raise NonFiniteTrainingError(self.stop_message(step, what))

    def stop_message(self, step: int, what: str) -> str:
        """The error after ``max_bad_steps`` skipped steps ending at ``step``."""
        if self.last_checkpoint is not None:
            kept = (
                f"the last good checkpoint is kept: {self.last_checkpoint[0]} (step "
                f"{self.last_checkpoint[1]}); rerunning the same command resumes from it"
            )
        else:
            kept = (
                "no checkpoint of this stage was written yet (pipeline.checkpoint_every), so a "
                "rerun starts the stage from its input model"
            )
        return (
            f"learner: {self.bad_steps} consecutive steps ({step - self.bad_steps + 1}-{step}) "
            f"had a non-finite loss or gradient (last: {what}; learner.max_bad_steps="
            f"{self.max_bad_steps}); stopping. None of them changed the weights; {kept}. "
            "Lower learner.lr or check the data and loss settings first."
        )


def skipped_message(step: int, what: str, count: int, limit: int) -> str:
    """The warning logged for a skipped step."""
    return (
        f"learner: step {step} skipped: non-finite loss or gradient ({what}); weights and "
        f"optimizer state unchanged ({count} of learner.max_bad_steps={limit} in a row)"
    )
