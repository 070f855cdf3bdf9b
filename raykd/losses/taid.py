"""TAID: Temporally Adaptive Interpolated Distillation (Shing et al., ICLR 2025).

The student is trained towards an intermediate distribution that moves from (a detached copy
of) itself to the teacher as the interpolation parameter ``t`` goes from ``t_start`` to 1:

    ``p_t = softmax(((1 − t) · sg(z_S) + t · z_T) / τ)``,  loss ``= KL(p_t ‖ q_S)``

with ``q_S = softmax(z_S / τ)`` and ``sg`` = stop-gradient, so the student gradient is
``(q_S − p_t) / τ`` per position. :class:`TAIDSchedule` drives ``t``.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

from torch import Tensor

from ._rowwise import DEFAULT_CHUNK_SIZE, rowwise
from .divergences import check_divergence_params, forward_kl_fused_, kl_rows, tempered_log_softmax


def _taid_rows(z_s: Tensor, z_t: Tensor, *, t: float, temperature: float) -> tuple[Tensor]:
    target = tempered_log_softmax((1.0 - t) * z_s.detach() + t * z_t, temperature)
    return (kl_rows(target, tempered_log_softmax(z_s, temperature)),)


def _taid_fused_rows(
    z_s: Tensor, z_t: Tensor, *, t: float, temperature: float
) -> tuple[tuple[Tensor], Tensor]:
    target_logits = z_t.mul_(t).add_(z_s, alpha=1.0 - t)  # in place on the chunk's copy
    value, grad = forward_kl_fused_(z_s, target_logits, temperature)  # grad (q − p_t) / τ
    return (value,), grad


def taid_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    *,
    t: float,
    temperature: float = 1.0,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """Per-position TAID loss ``KL(p_t ‖ q_S)``, ``p_t = softmax(((1−t)·sg(z_S) + t·z_T)/τ)``.

    At ``t = 1`` this is the forward KL to the teacher; at ``t = 0`` the value and the
    gradient are 0.

    Args:
        student_logits, teacher_logits: ``[..., V]``.
        mask: ``[...]`` float/bool, 1 = position counts.
        t: interpolation parameter in ``[0, 1]`` (from :class:`TAIDSchedule`).
        temperature: ``τ`` applied to the interpolated logits and to the student.
        chunk_size: positions per chunk, ``None`` for all at once.

    Returns:
        ``[...]``, zero where mask is 0; reduce with :func:`raykd.losses.reduce_loss`.
    """
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"t must be in [0, 1], got {t}")
    check_divergence_params(temperature)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError("student and teacher logits must have the same shape")
    row_fn = partial(_taid_rows, t=float(t), temperature=temperature)
    fused_fn = partial(_taid_fused_rows, t=float(t), temperature=temperature)
    return rowwise(student_logits, row_fn, (teacher_logits,), mask, chunk_size, fused_fn)[0]


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


class TAIDSchedule:
    """Adaptive schedule for TAID's ``t`` (Shing et al. 2025, Alg. 1).

    Call :meth:`step` once per optimizer step with the objective ``J_n`` just computed (at the
    current ``t``); it returns the ``t`` for the next step. With ``N = total_steps``::

        n ← n + 1
        t_lin = t_start + (t_end − t_start) · min(n / N, 1)     # the linear floor
        if n == 1:  J_prev ← J_n; return t                      # first call only records J
        δ_n = (J_prev − J_n) / (J_prev + ε)                     # relative improvement
        m_n = β · m_{n−1} + (1 − β) · δ_n                       # momentum, m_0 = 0
        t   ← min(t_end, max(t_lin, t + α · sigmoid(m_n) · (1 − t)))
        J_prev ← J_n

    ``t`` never decreases, never falls behind the linear schedule and never exceeds
    ``t_end``; while the objective falls quickly (``m > 0``) it runs ahead of the linear
    schedule, by at most ``α (1 − t)`` per step. ``adaptive=False`` gives ``t = t_lin``. The
    defaults are the paper's (``t_start = 0.4, α = 5e-4, β = 0.99``).
    """

    def __init__(
        self,
        t_start: float = 0.4,
        t_end: float = 1.0,
        alpha: float = 5e-4,
        beta: float = 0.99,
        total_steps: int = 1000,
        *,
        adaptive: bool = True,
        eps: float = 1e-15,
    ) -> None:
        if not 0.0 <= t_start <= t_end <= 1.0:
            raise ValueError(f"need 0 <= t_start <= t_end <= 1, got {t_start}, {t_end}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha (step size) must be in [0, 1], got {alpha}")
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta (momentum) must be in [0, 1), got {beta}")
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.t_start, self.t_end = float(t_start), float(t_end)
        self.alpha, self.beta, self.eps = float(alpha), float(beta), float(eps)
        self.total_steps, self.adaptive = int(total_steps), adaptive
        self.t = self.t_start
        self.momentum = 0.0
        self.prev_loss: float | None = None
        self.num_steps = 0

    def linear_t(self, step: int) -> float:
        """``t_start + (t_end − t_start) · min(step / total_steps, 1)``."""
        return self.t_start + (self.t_end - self.t_start) * min(step / self.total_steps, 1.0)

    def step(self, loss_value: float) -> float:
        """Record objective ``J_n`` (a float) and return the updated ``t``."""
        loss_value = float(loss_value)
        if not math.isfinite(loss_value):
            raise ValueError(f"TAID schedule got a non-finite loss {loss_value}")
        self.num_steps += 1
        t_lin = self.linear_t(self.num_steps)
        if not self.adaptive:
            self.t = t_lin
        elif self.prev_loss is None:
            self.prev_loss = loss_value
        else:
            delta = (self.prev_loss - loss_value) / (self.prev_loss + self.eps)
            self.momentum = self.beta * self.momentum + (1.0 - self.beta) * delta
            adaptive_t = self.t + self.alpha * _sigmoid(self.momentum) * (1.0 - self.t)
            self.t = min(self.t_end, max(t_lin, adaptive_t))
            self.prev_loss = loss_value
        return self.t

    def state_dict(self) -> dict[str, Any]:
        """Checkpointable state (the hyperparameters are not included)."""
        return {
            "t": self.t,
            "momentum": self.momentum,
            "prev_loss": self.prev_loss,
            "num_steps": self.num_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.t = float(state["t"])
        self.momentum = float(state["momentum"])
        self.prev_loss = None if state["prev_loss"] is None else float(state["prev_loss"])
        self.num_steps = int(state["num_steps"])
