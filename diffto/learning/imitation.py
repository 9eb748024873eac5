"""Imitation of an expert MPC through the differentiable MPC layer (Amos et al., 2018).

An expert MPC with unknown cost weights ``(q*, r*)`` (and possibly unknown physical
parameters) produced plans ``(x*, u*)`` from initial states ``x0``. The learner is the same
kind of controller, ``SolverPolicy`` → :class:`diffto.layers.MPC`, with log-parameterized
weights; it is trained by gradient descent on the imitation loss

.. math::

    ℓ(θ) = \\frac{1}{B} \\sum_b \\frac{1}{T m} \\lVert u_θ(x0_b) - u^*_b \\rVert^2
           \\; [+ \\frac{1}{(T+1) n} \\lVert x_θ(x0_b) - x^*_b \\rVert^2],

where ``(x_θ, u_θ) = argmin`` of the learner's MPC problem; ``∂ℓ/∂θ`` comes from the layer's
implicit backward (the KKT conditions at the plan), reaching the cost weights and, when asked,
the dynamics module's physical parameters. ``θ`` is either free parameters shared by every
row (``conditioning="none"``: recover the expert's cost) or a network of the state (and goal)
(``"state"``, ``"state_goal"``: the general SolverPolicy form).

Plans do not change when every weight is scaled by one factor, so weights are compared after
normalizing to geometric mean one; ``train/weight_error`` is
``‖ŵ − w*‖ / ‖w*‖`` for the normalized ``w = [q; r]``.
"""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from diffto.data.expert_mpc import make_system
from diffto.policies import SolverPolicy, SolverPolicyOutput, normalized_log_weights

__all__ = ["MPCImitation", "imitation_loss", "weight_error"]


def imitation_loss(
    u: Tensor, u_expert: Tensor, x: Tensor | None = None, x_expert: Tensor | None = None
) -> Tensor:
    """Mean squared error of controls ``u, u_expert (B, T, m)``, plus that of states
    ``x, x_expert (B, T+1, n)`` when given; returns a scalar."""
    if u.shape != u_expert.shape:
        raise ValueError(f"u {tuple(u.shape)} and u_expert {tuple(u_expert.shape)} must match")
    loss = torch.mean((u - u_expert) ** 2)
    if x is not None:
        if x_expert is None or x.shape != x_expert.shape:
            got = None if x_expert is None else tuple(x_expert.shape)
            raise ValueError(f"x {tuple(x.shape)} and x_expert {got} must match")
        loss = loss + torch.mean((x - x_expert) ** 2)
    return loss


def weight_error(w: Tensor, w_expert: Tensor) -> Tensor:
    """Relative error ``‖ŵ − ŵ*‖ / ‖ŵ*‖`` of positive weights ``w (..., k)`` against
    ``w_expert (k,)``, both normalized to geometric mean one (the plan's invariant)."""
    w_hat = normalized_log_weights(w.log()).exp()
    w_star = normalized_log_weights(w_expert.log()).exp()
    return torch.linalg.vector_norm(w_hat - w_star, dim=-1) / torch.linalg.vector_norm(w_star)


class MPCImitation(L.LightningModule):
    """Learn an MPC's cost weights (and optionally physical parameters) from expert plans.

    Expects batches from :class:`diffto.data.expert_mpc.ExpertMPCDataModule` (dicts with
    ``x0 (B, n)``, ``states (B, T+1, n)``, ``actions (B, T, m)``, ``goal (B, n)``); when the
    datamodule is attached, its ``meta`` supplies the expert's weights and dynamics for the
    diagnostics, and is checked against this module's system, horizon, step and bounds.

    Args:
        system: ``"pendulum"`` or ``"cartpole"``; the learner's dynamics.
        horizon: ``T`` of the learner's MPC (must equal the expert's).
        dt: integration step (must equal the expert's).
        u_bound: symmetric control bound of the learner's MPC (``None``: unbounded).
        init_q: initial state weights (``n`` numbers; default ones).
        init_r: initial control weights (``m`` numbers; default ones).
        learn_dynamics: physical parameters to learn too (e.g. ``["mass"]``); every other
            parameter must equal the expert's.
        init_dynamics: initial values of physical parameters (the learned ones' starting
            guesses, e.g. ``{"mass": 0.7}``).
        conditioning: ``"none"`` (free parameters), ``"state"`` (a network of ``x0``) or
            ``"state_goal"`` (a network of ``x0`` and the goal).
        hidden: hidden widths of that network.
        loss_on: imitate ``"u"`` (controls), ``"x"`` (states) or ``"xu"`` (both).
        optimizer: ``"adam"``, or ``"lbfgs"`` (L-BFGS with a strong-Wolfe line search, 5
            iterations per training step; for full-batch training of a few parameters, where
            it converges without Adam's overshoot).
        lr: Adam's learning rate (on log-weights: a step of 0.1 changes a weight by ~10%), or
            L-BFGS's initial step length (use 1.0).
        lr_schedule: ``"cosine"`` anneals the rate to zero over the run's optimizer steps
            (Adam with a constant rate keeps hopping around the optimum at ±lr in log space);
            ``"constant"`` keeps it.
        max_iter: iteration cap of the learner's MPC per solve.
        tol: convergence tolerance of the learner's MPC (``None``: the layer's default).
        warm_start_from_expert: start each solve at the expert's controls. The optimum does
            not depend on the start, but on a nonconvex problem it selects the local optimum
            near the expert's plan, and it cuts iterations.
        dtype: ``"float64"`` or ``"float32"`` for the learner's parameters and solves.
    """

    def __init__(
        self,
        system: Literal["pendulum", "cartpole"] = "pendulum",
        horizon: int = 20,
        dt: float = 0.05,
        u_bound: float | None = 4.0,
        init_q: list[float] | None = None,
        init_r: list[float] | None = None,
        learn_dynamics: list[str] | None = None,
        init_dynamics: dict[str, float] | None = None,
        conditioning: Literal["none", "state", "state_goal"] = "none",
        hidden: list[int] | None = None,
        loss_on: Literal["u", "x", "xu"] = "u",
        optimizer: Literal["adam", "lbfgs"] = "adam",
        lr: float = 0.2,
        lr_schedule: Literal["constant", "cosine"] = "cosine",
        max_iter: int = 30,
        tol: float | None = None,
        warm_start_from_expert: bool = True,
        dtype: Literal["float64", "float32"] = "float64",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        from diffto.layers.mpc import MPC

        if conditioning not in ("none", "state", "state_goal"):
            raise ValueError(f"conditioning must be 'none', 'state' or 'state_goal', got "
                             f"{conditioning!r}")
        if loss_on not in ("u", "x", "xu"):
            raise ValueError(f"loss_on must be 'u', 'x' or 'xu', got {loss_on!r}")
        if dtype not in ("float64", "float32"):
            raise ValueError(f"dtype must be 'float64' or 'float32', got {dtype!r}")
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if optimizer not in ("adam", "lbfgs"):
            raise ValueError(f"optimizer must be 'adam' or 'lbfgs', got {optimizer!r}")
        if lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {lr_schedule!r}")
        self.learn_dynamics = list(learn_dynamics or [])
        self.dynamics = make_system(system, dt, init_dynamics, self.learn_dynamics)
        n, m = self.dynamics.n_state, self.dynamics.n_ctrl
        bounds = {} if u_bound is None else {"u_lower": -u_bound, "u_upper": u_bound}
        solver = MPC(self.dynamics, horizon, max_iter=max_iter, tol=tol, **bounds)
        self.policy = SolverPolicy(
            solver, n, m, horizon,
            obs_dim=None if conditioning == "none" else n,
            goal_dim=n if conditioning == "state_goal" else 0,
            hidden=tuple(hidden or (64, 64)),
            init_q=init_q, init_r=init_r,
        )
        self.to(getattr(torch, dtype))
        self._dtype = getattr(torch, dtype)
        self.expert_meta: dict[str, Any] | None = None

    # ------------------------------------------------------------------ expert bookkeeping
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        meta = getattr(dm, "meta", None) if dm is not None and dm.data is not None else None
        if meta is not None:
            self.check_expert(meta)
            self.expert_meta = meta

    def check_expert(self, meta: dict[str, Any]) -> None:
        """Raise ``ValueError`` if the expert data were made for another problem."""
        hp = self.hparams
        for key, mine in (("system", hp.system), ("horizon", hp.horizon), ("dt", hp.dt),
                          ("u_bound", hp.u_bound)):
            if key in meta and meta[key] != mine:
                raise ValueError(f"expert data have {key}={meta[key]!r} but the model has "
                                 f"{key}={mine!r}")
        expert_dyn = meta.get("dynamics", {})
        mine = self.dynamics.physical_parameters()
        for name, value in expert_dyn.items():
            if name not in self.learn_dynamics and abs(mine[name] - value) > 1e-9 * (1 + value):
                raise ValueError(
                    f"the expert's {name}={value} differs from the model's {mine[name]} and "
                    f"{name} is not in learn_dynamics: set init_dynamics or learn it"
                )

    def expert_weights(self) -> Tensor | None:
        """``[q*; r*]`` from the expert data's meta, or ``None`` when unknown."""
        if self.expert_meta is None or "cost_weights" not in self.expert_meta:
            return None
        w = self.expert_meta["cost_weights"]["q"] + self.expert_meta["cost_weights"]["r"]
        return torch.tensor(w, dtype=self._dtype, device=self.device)

    # ------------------------------------------------------------------ forward and loss
    def forward(self, batch: dict[str, Tensor]) -> SolverPolicyOutput:
        x0 = batch["x0"].to(self._dtype)
        goal = batch.get("goal")
        goal = None if goal is None else goal.to(self._dtype)
        u_init = batch["actions"].to(self._dtype) if self.hparams.warm_start_from_expert else None
        return self.policy(x0, goal=goal, u_init=u_init)

    def _step(self, batch: dict[str, Tensor], prefix: str) -> Tensor:
        out = self(batch)
        sol = out.solution
        on = self.hparams.loss_on
        u_exp = batch["actions"].to(self._dtype)
        x_exp = batch["states"].to(self._dtype)
        if on == "x":
            loss = torch.mean((sol.x - x_exp) ** 2)
        else:
            loss = imitation_loss(sol.u, u_exp, *((sol.x, x_exp) if on == "xu" else ()))
        B = batch["x0"].shape[0]
        log = {f"{prefix}/loss_imitation": loss.detach(),
               "solver/iterations" if prefix == "train" else f"{prefix}/solver_iterations":
                   sol.iterations.double().mean(),
               "solver/converged_frac" if prefix == "train" else f"{prefix}/solver_converged_frac":
                   sol.converged.double().mean()}
        w_star = self.expert_weights()
        if w_star is not None:
            w = torch.cat([out.q, out.r], -1).detach()
            log[f"{prefix}/weight_error"] = weight_error(w, w_star).mean()
        if self.expert_meta is not None:
            expert_dyn = self.expert_meta.get("dynamics", {})
            for name in self.learn_dynamics:
                if name in expert_dyn:
                    value = getattr(self.dynamics, name).detach()
                    log[f"{prefix}/{name}_rel_error"] = (value - expert_dyn[name]).abs() / abs(
                        expert_dyn[name])
        self.log_dict({k: float(v) for k, v in log.items()}, prog_bar=prefix == "train",
                      batch_size=B, on_step=prefix == "train", on_epoch=True)
        return loss

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def configure_optimizers(self) -> Any:
        if self.hparams.optimizer == "lbfgs":  # its line search sets the step: no schedule
            return torch.optim.LBFGS(self.parameters(), lr=self.hparams.lr, max_iter=5,
                                     history_size=20, line_search_fn="strong_wolfe")
        opt = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        if self.hparams.lr_schedule == "constant":
            return opt
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_train_end(self) -> None:
        """Print the learned weights next to the expert's (the run's headline figure)."""
        w_star = self.expert_weights()
        if w_star is None or self.policy.params is None:
            return
        w = self.learned_weights().to(w_star)
        w_norm = normalized_log_weights(w_star.log()).exp()
        parts = [f"learned weights {[round(v, 4) for v in w.tolist()]} vs expert "
                 f"{[round(v, 4) for v in w_norm.tolist()]} (normalized [q; r]), relative "
                 f"error {weight_error(w, w_star).item():.4f}"]
        for name in self.learn_dynamics:
            expert = self.expert_meta.get("dynamics", {}).get(name)
            value = float(getattr(self.dynamics, name).detach())
            parts.append(f"{name} {value:.4f} vs expert {expert}")
        rank_zero_info("MPCImitation: " + "; ".join(parts))

    def learned_weights(self) -> Tensor:
        """Current normalized ``[q; r]`` of the free-parameter learner, ``(n+m,)``."""
        if self.policy.params is None:
            raise ValueError("learned_weights() is defined for conditioning='none' only")
        k = self.policy.n + self.policy.m
        return normalized_log_weights(self.policy.params[:k].detach()).exp()
