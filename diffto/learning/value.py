"""A critic from trajectory optimization: ``V(s, g)`` regressed on the expert's cost-to-go, and
its use as the terminal cost of a shorter-horizon MPC.

The expert datasets (:class:`diffto.data.trajectories.TrajectorySet`) store at every transition
the realized cost-to-go of the closed-loop expert episode,

.. math::

    G_t = \\sum_{k=t}^{L-1} \\ell(x_k, u_k, g),

with ``ℓ`` the expert's stage cost and ``L`` the episode length. :class:`CostToGoCritic` fits an
MLP ``V_θ(s, g) ≈ G`` by least squares on standardized inputs and targets,

.. math::

    \\mathcal{L}(θ) = \\frac{1}{N} \\sum_i \\Big( \\hat V_θ(\\tfrac{s_i - μ_s}{σ_s},
    \\tfrac{g_i - μ_g}{σ_g}) - \\tfrac{G_i - μ_G}{σ_G} \\Big)^2 ,
    \\qquad V_θ = μ_G + σ_G \\hat V_θ ,

the statistics ``μ, σ`` being buffers, so a checkpoint carries them.

Why it makes TO better: MPC over a horizon ``T`` approximates the infinite-horizon problem by
cutting it at ``T``. With ``V`` as the terminal cost, the problem over ``T' < T`` steps,

.. math::

    \\min_u \\sum_{t=0}^{T'-1} \\ell(x_t, u_t, g) + V_θ(x_{T'}, g),

is the Bellman decomposition of the long one: ``V`` carries what happens after ``T'``, so a
quarter of the horizon (a quarter of the solve time) keeps the long plan's behaviour where the
short one without ``V`` is myopic. :func:`learned_terminal_value` turns a trained critic and
the goals of a batch into the callable ``x_T (B, n) -> (B,)`` that an expert's
``cost(..., terminal_value=...)`` and ``solve(..., terminal_value=...)`` take (the terminal
term of a :class:`~diffto.NonlinearCost`). The solver differentiates it twice (the quadratic
model of the terminal cost), so the network uses a smooth activation (SiLU by default; with
ReLU its Hessian would be zero almost everywhere).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

from diffto.data.trajectories import TrajectorySet, load_trajectories
from diffto.policies import MLP

__all__ = [
    "CostToGoCritic",
    "CostToGoDataModule",
    "LearnedTerminalValue",
    "learned_terminal_value",
    "value_loss",
]

Activation = Literal["silu", "tanh", "softplus", "elu"]
_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "softplus": nn.Softplus,
    "elu": nn.ELU,
}
_STD_FLOOR = 1e-6  # a feature constant over the dataset (a fixed goal coordinate) stays finite


def value_loss(prediction: Tensor, target: Tensor) -> Tensor:
    """Mean squared error of normalized values ``prediction, target (B,)``; a scalar."""
    if prediction.shape != target.shape:
        raise ValueError(
            f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} must match"
        )
    return torch.mean((prediction - target) ** 2)


def _stats(name: str, value: Any, width: int | None) -> tuple[Tensor, Tensor]:
    """Mean and standard deviation (floored) of the rows of ``value (N, width)`` or ``(N,)``."""
    a = torch.as_tensor(np.asarray(value), dtype=torch.float64)
    if a.dim() == 1 and width is not None:
        a = a.unsqueeze(-1)
    if a.shape[0] < 1 or (width is not None and (a.dim() != 2 or a.shape[1] != width)):
        want = f"(N, {width})" if width is not None else "(N,)"
        raise ValueError(f"{name} must have shape {want} with N >= 1, got {tuple(a.shape)}")
    if not torch.isfinite(a).all():
        raise ValueError(f"{name} contains NaN/Inf")
    return a.mean(0), a.std(0, unbiased=False).clamp_min(_STD_FLOOR)


class _ValueBatches(Dataset):
    """Whole minibatches of a set's ``observation``, ``desired_goal`` (when present) and
    ``cost_to_go`` rows as float32 tensors: item ``idx`` (a list of rows) is one gather."""

    def __init__(self, data: TrajectorySet) -> None:
        self.tensors = {"observation": torch.as_tensor(data.observation, dtype=torch.float32),
                        "cost_to_go": torch.as_tensor(data.cost_to_go, dtype=torch.float32)}
        if data.desired_goal is not None:
            self.tensors["desired_goal"] = torch.as_tensor(data.desired_goal,
                                                           dtype=torch.float32)

    def __len__(self) -> int:
        return int(self.tensors["observation"].shape[0])

    def __getitem__(self, idx: list[int]) -> dict[str, Tensor]:
        rows = torch.as_tensor(idx, dtype=torch.long)
        return {k: v[rows] for k, v in self.tensors.items()}


class CostToGoDataModule(L.LightningDataModule):
    """Expert transitions with their cost-to-go, split into training and validation by
    episode (rows of one episode are near copies: a split by row validates on training data).

    Args:
        path: ``.npz`` file or folder of shards in the :mod:`diffto.data.trajectories` format;
            the set needs ``cost_to_go``, or ``cost`` to compute it from.
        batch_size: rows per training step.
        val_fraction: fraction of the episodes held out (at least one when > 0).
        split_seed: seed of the episode split.
        max_episodes: use only the first episodes (by id); ``None``: all.
    """

    def __init__(
        self,
        path: str,
        batch_size: int = 512,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        max_episodes: int | None = None,
    ) -> None:
        super().__init__()
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
        if max_episodes is not None and max_episodes < 1:
            raise ValueError(f"max_episodes must be >= 1 or None, got {max_episodes!r}")
        self.path, self.batch_size, self.val_fraction = path, batch_size, val_fraction
        self.split_seed, self.max_episodes = split_seed, max_episodes
        self.train_set: TrajectorySet | None = None
        self.val_set: TrajectorySet | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        data = load_trajectories(self.path)
        if data.cost_to_go is None:
            if data.cost is None:
                raise ValueError(f"{self.path}: the set has neither cost_to_go nor cost")
            data = data.with_cost_to_go()
        ids = data.episode_ids()
        if self.max_episodes is not None:
            ids = ids[: self.max_episodes]
            data = data.select_episodes(ids)
        n_val = 0 if self.val_fraction == 0 else max(1, round(self.val_fraction * len(ids)))
        if n_val >= len(ids):
            raise ValueError(f"val_fraction={self.val_fraction} leaves no training episode of "
                             f"{len(ids)}")
        val_ids = np.random.default_rng(self.split_seed).choice(ids, n_val, replace=False)
        self.train_set = data.select_episodes(np.setdiff1d(ids, val_ids))
        self.val_set = data.select_episodes(np.sort(val_ids)) if n_val else None

    def _loader(self, data: TrajectorySet, batch_size: int, shuffle: bool) -> DataLoader:
        ds = _ValueBatches(data)
        sampler = RandomSampler(ds) if shuffle else SequentialSampler(ds)
        return DataLoader(ds, batch_size=None, num_workers=0,
                          sampler=BatchSampler(sampler, batch_size, drop_last=False))

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            raise ValueError("call setup() first")
        return self._loader(self.train_set, self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_set is None:
            return []
        return self._loader(self.val_set, 8192, shuffle=False)


class CostToGoCritic(L.LightningModule):
    """``V(s, g)``: an MLP regressed on the cost-to-go of expert TO episodes.

    Batches are dicts with ``observation (B, o)``, ``desired_goal (B, g)`` and
    ``cost_to_go (B,)`` (the rows of a :class:`~diffto.data.trajectories.TrajectorySet`).
    The normalization statistics are computed once from the training rows at the start of
    ``fit`` (:meth:`fit_normalization`, unless already set) and saved with the weights.

    Args:
        observation_dim: ``o``; ``None`` takes it from the training data at the start of fit
            (it is then recorded in the hyperparameters, so checkpoints reload).
        goal_dim: ``g``, likewise; ``0`` for a critic of the state alone.
        hidden: hidden layer widths of the MLP.
        activation: smooth nonlinearity after every hidden layer (the MPC differentiates the
            value twice: see the module docstring).
        lr: Adam's learning rate.
        weight_decay: AdamW's decoupled weight decay.
        lr_schedule: ``"cosine"`` anneals the rate to zero over the run's optimizer steps,
            ``"constant"`` keeps it.
        input_noise: standard deviation of Gaussian noise added to the normalized
            observations of each training batch (the targets unchanged; 0: none). Expert data
            lie on a thin set of the state space (a Panda's joint velocities are nearly a
            function of its joint positions along reaching motions), and a critic fitted
            there alone extrapolates off it with large, arbitrary slopes, which an MPC that
            minimizes ``V`` then follows. Noise of standard deviation ``σ`` adds about
            ``σ² ‖∇V‖²`` to the loss (Bishop, 1995), flattening ``V`` across the data.
    """

    obs_mean: Tensor
    obs_std: Tensor
    goal_mean: Tensor
    goal_std: Tensor
    target_mean: Tensor
    target_std: Tensor
    normalized: Tensor

    def __init__(
        self,
        observation_dim: int | None = None,
        goal_dim: int | None = None,
        hidden: list[int] | None = None,
        activation: Activation = "silu",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        lr_schedule: Literal["constant", "cosine"] = "cosine",
        input_noise: float = 0.0,
    ) -> None:
        super().__init__()
        if not input_noise >= 0:
            raise ValueError(f"input_noise must be >= 0, got {input_noise!r}")
        if activation not in _ACTIVATIONS:
            raise ValueError(
                f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}"
            )
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr!r}")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
        if lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {lr_schedule!r}")
        for name, dim in (("observation_dim", observation_dim), ("goal_dim", goal_dim)):
            if dim is not None and (not isinstance(dim, int) or dim < (1 if name[0] == "o" else 0)):
                raise ValueError(f"{name} must be a non-negative int (observation_dim >= 1) or "
                                 f"None, got {dim!r}")
        self.save_hyperparameters()
        self.net: nn.Module | None = None
        self.register_buffer("normalized", torch.zeros((), dtype=torch.bool))
        if observation_dim is not None and goal_dim is not None:
            self._build(observation_dim, goal_dim)

    def _build(self, observation_dim: int, goal_dim: int) -> None:
        hp = self.hparams
        hp.observation_dim, hp.goal_dim = observation_dim, goal_dim
        hidden = hp.hidden if hp.hidden is not None else [256, 256]
        self.net = MLP(observation_dim + goal_dim, 1, hidden, _ACTIVATIONS[hp.activation])
        for name, width in (("obs", observation_dim), ("goal", goal_dim)):
            self.register_buffer(f"{name}_mean", torch.zeros(width))
            self.register_buffer(f"{name}_std", torch.ones(width))
        self.register_buffer("target_mean", torch.zeros(()))
        self.register_buffer("target_std", torch.ones(()))

    # ------------------------------------------------------------------ normalization
    def fit_normalization(self, observation: Any, goal: Any, cost_to_go: Any) -> None:
        """Set the input and target statistics from training rows ``observation (N, o)``,
        ``goal (N, g)`` (``None`` when ``g = 0``) and ``cost_to_go (N,)``; builds the network
        first when its sizes were left to the data."""
        obs = np.asarray(observation)
        if obs.ndim != 2:
            raise ValueError(f"observation must have shape (N, o), got {obs.shape}")
        g = 0 if goal is None else np.asarray(goal).reshape(len(obs), -1).shape[1]
        if self.net is None:
            self._build(obs.shape[1], g)
        o_dim, g_dim = self.hparams.observation_dim, self.hparams.goal_dim
        mean, std = _stats("observation", obs, o_dim)
        self.obs_mean.copy_(mean)
        self.obs_std.copy_(std)
        if g_dim > 0:
            if goal is None:
                raise ValueError(f"goal must be given for a critic with goal_dim={g_dim}")
            mean, std = _stats("goal", goal, g_dim)
            self.goal_mean.copy_(mean)
            self.goal_std.copy_(std)
        mean, std = _stats("cost_to_go", np.asarray(cost_to_go).reshape(-1), None)
        if len(np.asarray(cost_to_go).reshape(-1)) != len(obs):
            raise ValueError("cost_to_go must have one entry per observation row")
        self.target_mean.copy_(mean)
        self.target_std.copy_(std)
        self.normalized.fill_(True)

    def setup(self, stage: str) -> None:
        """At the start of fit, take the statistics (and sizes) from the datamodule's training
        rows unless they are set already (a resumed or fine-tuned critic keeps its own)."""
        if stage != "fit" or bool(self.normalized):
            return
        dm = getattr(self.trainer, "datamodule", None)
        train = getattr(dm, "train_set", None) if dm is not None else None
        if train is None:
            raise ValueError(
                "CostToGoCritic needs its normalization statistics: call fit_normalization(...) "
                "or train with a datamodule that exposes the training TrajectorySet as train_set"
            )
        if train.cost_to_go is None:
            raise ValueError("the training data have no cost_to_go array: the critic's target")
        self.fit_normalization(train.observation, train.desired_goal, train.cost_to_go)

    # ------------------------------------------------------------------ the value
    def _check_ready(self) -> nn.Module:
        if self.net is None:
            raise ValueError("the critic has no network yet: give observation_dim and goal_dim "
                             "or call fit_normalization(...) first")
        return self.net

    def normalized_value(self, observation: Tensor, goal: Tensor | None = None,
                         noise: float = 0.0) -> Tensor:
        """``V̂ (B,)``, the network's output in standardized target units, for
        ``observation (B, o)`` and ``goal (B, g)``; ``noise`` is the standard deviation of
        Gaussian noise on the normalized observation (training only)."""
        net = self._check_ready()
        o_dim, g_dim = self.hparams.observation_dim, self.hparams.goal_dim
        if observation.dim() != 2 or observation.shape[1] != o_dim:
            raise ValueError(f"observation must have shape (B, {o_dim}), got "
                             f"{tuple(observation.shape)}")
        dtype = self.obs_mean.dtype
        obs = (observation.to(dtype) - self.obs_mean) / self.obs_std
        parts = [obs + noise * torch.randn_like(obs) if noise > 0 else obs]
        if g_dim > 0:
            if goal is None or goal.dim() != 2 or goal.shape != (observation.shape[0], g_dim):
                got = None if goal is None else tuple(goal.shape)
                raise ValueError(f"goal must have shape ({observation.shape[0]}, {g_dim}), got "
                                 f"{got}")
            parts.append((goal.to(dtype) - self.goal_mean) / self.goal_std)
        return net(torch.cat(parts, -1)).squeeze(-1)

    def forward(self, observation: Tensor, goal: Tensor | None = None) -> Tensor:
        """``V(s, g) (B,)`` in cost units, in ``observation``'s dtype, for ``observation
        (B, o)`` and ``goal (B, g)``; differentiable in both."""
        v = self.target_mean + self.target_std * self.normalized_value(observation, goal)
        return v.to(observation.dtype)

    # ------------------------------------------------------------------ training
    def _step(self, batch: dict[str, Tensor], prefix: str) -> Tensor:
        target = (batch["cost_to_go"].to(self.target_mean.dtype) - self.target_mean)
        target = target / self.target_std
        noise = self.hparams.input_noise if prefix == "train" else 0.0
        pred = self.normalized_value(batch["observation"], batch.get("desired_goal"), noise)
        loss = value_loss(pred, target.reshape(pred.shape))
        B = pred.shape[0]
        self.log(f"{prefix}/loss_value", loss, prog_bar=True, batch_size=B)
        with torch.no_grad():
            # The error in cost units, and the fraction of the target variance left unexplained
            # (1 − R²): 1 is the constant predictor's error.
            err = (pred - target.reshape(pred.shape)) * self.target_std
            self.log(f"{prefix}/value_mae", err.abs().mean(), batch_size=B)
            self.log(f"{prefix}/unexplained_variance", loss, batch_size=B)
        return loss

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def configure_optimizers(self) -> Any:
        self._check_ready()
        hp = self.hparams
        opt = torch.optim.AdamW(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        if hp.lr_schedule == "constant":
            return opt
        steps = self.trainer.estimated_stepping_batches
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(int(steps), 1))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A checkpoint of a critic whose sizes came from the data: build the network before
        its weights are loaded."""
        if self.net is None:
            hp = checkpoint.get("hyper_parameters", {})
            if hp.get("observation_dim") is not None and hp.get("goal_dim") is not None:
                self._build(hp["observation_dim"], hp["goal_dim"])


class LearnedTerminalValue(nn.Module):
    """A critic as the terminal cost of a receding-horizon controller: ``(x_T (B, n),
    goal (B, g)) -> weight · V(obs(x_T), g) (B,)``, the form
    :class:`~diffto.tasks.mpc_expert.RecedingHorizon`'s ``terminal_value`` takes (it closes
    each step's goals over before the solve).

    Args:
        critic: a trained :class:`CostToGoCritic`.
        observation_of: planning states ``(B, n)`` -> the critic's observations ``(B, o)``,
            differentiable in torch; ``None``: the planning state is the observation.
        weight: factor on the value.
        dtype: the precision the value is evaluated in; a copy of the critic is converted
            to it. float64 by default, the experts' precision: the solver builds a quadratic
            model of ``V`` from its first and second derivatives, and float32 derivatives are
            too noisy for its convergence test at the experts' tolerances (the Newton step
            never falls below ``tol`` and the Levenberg-Marquardt factor climbs instead).
    """

    def __init__(
        self,
        critic: CostToGoCritic,
        observation_of: Callable[[Tensor], Tensor] | None = None,
        weight: float = 1.0,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        super().__init__()
        if not isinstance(critic, CostToGoCritic):
            raise ValueError(f"critic must be a CostToGoCritic, got {type(critic).__name__}")
        critic._check_ready()
        if observation_of is not None and not callable(observation_of):
            raise ValueError(f"observation_of must be callable or None, got {observation_of!r}")
        if not weight > 0:
            raise ValueError(f"weight must be > 0, got {weight!r}")
        # A fresh module with the critic's state (not a deep copy: that would copy a trainer).
        copy = CostToGoCritic(**dict(critic.hparams))
        copy.load_state_dict(critic.state_dict())
        self.critic = copy.to(dtype).eval()
        self.critic.requires_grad_(False)  # a fixed terminal cost: no gradient to its weights
        self.observation_of, self.weight = observation_of, float(weight)

    def forward(self, xT: Tensor, goal: Tensor | None = None) -> Tensor:
        """``(B,)`` values in ``xT``'s dtype, twice differentiable in ``xT``."""
        if xT.dim() != 2:
            raise ValueError(f"x_T must have shape (B, n), got {tuple(xT.shape)}")
        if goal is not None and goal.shape[0] != xT.shape[0]:
            raise ValueError(f"goal must have {xT.shape[0]} rows as x_T, got {tuple(goal.shape)}")
        obs = xT if self.observation_of is None else self.observation_of(xT)
        return self.weight * self.critic(obs, None if goal is None else goal.detach()).to(xT.dtype)


def learned_terminal_value(
    critic: CostToGoCritic,
    goal: Tensor | None,
    observation_of: Callable[[Tensor], Tensor] | None = None,
    weight: float = 1.0,
) -> Callable[[Tensor], Tensor]:
    """The terminal cost ``x_T (B, n) -> weight · V(obs(x_T), g) (B,)`` of a trained critic for
    the goals ``goal (B, g)`` of one batch of problems.

    Args:
        critic: a trained :class:`CostToGoCritic` (a float64 copy of it is evaluated, see
            :class:`LearnedTerminalValue`; build that once where many solves share a critic).
        goal: ``(B, g)`` goals aligned with the batch the solver is called on (``None`` for a
            critic with ``goal_dim = 0``).
        observation_of: maps planning states ``(B, n)`` to the critic's input ``(B, o)``
            (differentiably, in torch); ``None`` when the planning state is the observation.
        weight: factor on the value (``1``: the cost-to-go in the expert's stage-cost units).

    Returns:
        A callable for an expert's ``terminal_value`` (a :class:`~diffto.NonlinearCost`
        terminal term): values in ``x_T``'s dtype, twice differentiable in ``x_T``.
    """
    value = LearnedTerminalValue(critic, observation_of, weight)
    g_dim = critic.hparams.goal_dim
    if g_dim > 0 and (goal is None or goal.dim() != 2 or goal.shape[1] != g_dim):
        got = None if goal is None else tuple(goal.shape)
        raise ValueError(f"goal must have shape (B, {g_dim}), got {got}")
    goal = None if goal is None else goal.detach()

    def terminal_value(xT: Tensor) -> Tensor:
        return value(xT, goal)

    return terminal_value
