"""A policy that steers a differentiable MPC: it picks the MPC's target, the MPC the torques.

The policy ``π_θ(s₀, g)`` maps the first observation of an episode (joint state, obstacle)
and the task goal ``g`` to a via-point ``w``, the flange target of a differentiable MPC
(:class:`~diffto.tasks.panda.target_mpc.PandaTargetMPC`: joint torques of the Panda, model
linearized about each call's state). The MPC's target is ``w`` for the first ``via_steps``
control steps and the goal after them. The MPC's cost knows only its target; what it does
not know (the keep-out sphere of ``diffto/PandaObstacleReach-v0``) the policy must handle by
placing ``w`` away from the path to ``g``. The network outputs a bounded offset,
``w = g + δ_max tanh(net(·))``, with the last layer initialized to zero, so training starts
from the MPC aimed straight at the goal (the baseline every report compares with).

The schedule: a short detour, then the goal
    The MPC aimed at a point 0.3 m away settles within the 2 cm success radius in about 50
    control steps (``position_weight`` 100, closed loop in MuJoCo), and success is judged at
    the episode's last step (100). Every control step spent aiming at the via-point is one
    not spent converging on the goal: with ``via_steps`` 30, 20 and 10 (``margin`` 2 cm, 100
    training steps, seed 0, 32 held-out episodes) the closed-loop success was 0.53, 0.81 and
    0.94 (collisions 0, 0 and 6 %), against 0.16 for 40 after 200 steps. The default aims at
    the via-point for the first 10 control steps only: the policy places it (up to
    ``max_offset`` per axis from the goal) so that this short pull sets the flange moving
    off the straight line, and the motion towards the goal that follows passes beside the
    sphere. In training the path keeps ``margin`` 3 cm beyond the keep-out sphere, room for
    the difference between the model rollout and MuJoCo.

Training: a differentiable closed-loop model rollout, no environment steps
    From a batch of episode starts ``(x₀, g, o, ρ)`` (drawn by resetting the environment on the
    training seeds ``0 … train_configurations − 1``; a reset is not a step), the rollout repeats
    ``rollout_steps / target_every`` times: the target ``r_j`` of the schedule
    (``w = π_θ(x₀, g, o, ρ)`` while ``j · target_every < via_steps``, else ``g``), one MPC
    solve from ``x``, and the first ``target_every`` planned states become the rollout; the
    planned state after them starts the next segment (the model is relinearized there). The
    flange path ``p_k = FK(q_k)`` (exact forward kinematics, ``k = 1 … K``) is scored by
    :func:`obstacle_reach_loss` and ``∂loss/∂θ`` flows through every MPC solve (implicit
    backward of :class:`diffto.layers.MPC`) into ``w`` and the segment start states.

Closed loop in MuJoCo (validation, report)
    The same controller in receding horizon on the full simulation: the policy chooses ``w``
    from the episode's first observation, the MPC replans from the measured state at every
    control step towards ``w`` (steps ``k < via_steps``) or ``g``. ``val/success`` is the
    env's ``is_success`` at the episode's last step (the goal reached and held, no collision:
    a collision ends the episode), ``val/collision`` the share of episodes that hit the
    obstacle.

Measured (seed 0, float32, one torch thread on 2 shared cores; ``position_weight`` 100)
    ``OMP_NUM_THREADS=1 python benchmarks/bench_panda_goal_policy.py`` (200 training steps,
    3.6 min; 32 held-out episodes): success 1.00, no collision, final distance 0.4 cm, against
    0.06 and 94 % collisions for the MPC aimed at the goal; SAC + HER on torques: 0.00 after
    30 000 environment steps; the MPC layer took 82 % of the training time.
    ``lightning fit --config lightning_configs/panda_goal_policy.yaml`` (the same defaults,
    6.4 min in all with the refined row; its report's 50 held-out episodes): success 0.90,
    10 % collisions, against 0.02 and 98 %.

Refinement at test time (``refine_steps``)
    The policy amortizes an optimization over episodes and misses some: with the defaults, the
    5 of 50 report episodes that collide (seed 0) also collide in the training's model
    rollout, yet for 4 of them a via-point inside the policy's box clears the sphere there
    (``benchmarks/bench_panda_goal_policy_misses.py``). With
    ``refine_steps`` > 0 the closed loop starts, in every episode, from the policy's via-point
    and takes that many Adam steps (learning rate ``refine_lr``) on the training loss of that
    episode's model rollout with respect to the via-point alone (kept inside the policy's box
    ``g ± max_offset``), then runs as before. The report adds the refined row beside the
    policy's; validation uses the policy alone. Each step is one model rollout forward and
    backward (for the whole batch of episodes at once). Measured (the config, training seeds
    0 / 1 / 2, the report's 50 held-out episodes): success 0.90 / 0.92 / 0.88 with 10 / 8 /
    12 % collisions from the policy alone, 0.98 / 0.98 / 1.00 with 2 / 2 / 0 % after 30
    refinement steps (the batch's refinement: 0.45–0.49 s per episode with one other job on
    the 2 cores; ``benchmarks/results/panda_goal_policy_seeds.json``).

Timing
    ``time/mpc_share`` is the share of a training step spent in the MPC layer: its forward
    solves (timed around the calls) and its backward passes (from the moment the gradient of a
    plan is complete to the moment the gradient of its target (or, where the target is the
    goal, of its initial state) is, read by tensor hooks).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from diffto.learning.goal_evaluation import (
    _write_json,
    eval_seeds,
    make_env_fps,
    rollout_episodes,
    save_video,
)
from diffto.tasks.panda.model import HOME
from diffto.tasks.panda.target_mpc import PandaTargetMPC
from diffto.tasks.registry import make_env

__all__ = ["MPCGoalPolicy", "TargetPolicy", "obstacle_reach_loss"]

OBS_DIM = 18  # [qpos (7); qvel (7); obstacle centre (3); obstacle radius (1)]


def obstacle_reach_loss(
    path: Tensor, goal: Tensor, center: Tensor, radius: Tensor, clearance: float,
    obstacle_weight: float = 100.0, goal_weight: float = 1.0,
) -> dict[str, Tensor]:
    """Loss of flange paths that must reach a goal without entering a sphere.

    ``loss_obstacle = w_o · mean_b Σ_k max(0, ρ_b + clearance − ‖p_bk − o_b‖)²`` (squared
    penetration of the sphere grown by ``clearance``, summed over the path) and
    ``loss_goal = w_g · mean_b mean_k (k / k̄) ‖p_bk − g_b‖`` (distance averaged over the path
    with weights rising linearly in time, ``k̄`` the mean of ``k = 1 … K``: reach soon, and
    above all be there at the end). Returns those two, their sum ``loss``, ``row_loss (B,)``
    (each path's share: ``loss = mean_b row_loss_b``), and diagnostics ``collision`` (share of
    rows whose path enters the sphere grown by ``clearance``) and ``final_distance`` (m, mean).

    Args:
        path: ``(B, K, 3)`` flange positions. goal, center: ``(B, 3)``. radius: ``(B,)``.
        clearance: metres added to ``radius`` (the flange's own radius plus a margin).
    """
    if path.dim() != 3 or path.shape[-1] != 3:
        raise ValueError(f"path must have shape (B, K, 3), got {tuple(path.shape)}")
    B = path.shape[0]
    for name, t, shape in (("goal", goal, (B, 3)), ("center", center, (B, 3)),
                           ("radius", radius, (B,))):
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    depth = torch.relu(radius[:, None] + clearance -
                       torch.linalg.vector_norm(path - center[:, None], dim=-1))  # (B, K)
    distance = torch.linalg.vector_norm(path - goal[:, None], dim=-1)  # (B, K)
    row_obstacle = obstacle_weight * (depth ** 2).sum(1)  # (B,)
    ramp = torch.arange(1, path.shape[1] + 1, dtype=path.dtype, device=path.device)
    row_goal = goal_weight * (distance * (ramp / ramp.mean())).mean(1)  # (B,)
    row_loss = row_obstacle + row_goal
    return {"loss": row_loss.mean(), "row_loss": row_loss, "loss_obstacle": row_obstacle.mean(),
            "loss_goal": row_goal.mean(),
            "collision": (depth > 0).any(1).float().mean().detach(),
            "final_distance": distance[:, -1].mean().detach()}


class TargetPolicy(nn.Module):
    """``r = g + δ_max tanh(net([q − q_home; v; p; g − p; o − p; ρ]))``: the MPC's flange
    target from the observation ``(B, 18)``, the goal ``(B, 3)`` and the flange position
    ``p (B, 3)``; the last layer starts at zero (``r = g``)."""

    def __init__(self, hidden: tuple[int, ...] = (128, 128), max_offset: float = 0.3) -> None:
        super().__init__()
        if not max_offset > 0:
            raise ValueError(f"max_offset must be > 0 (m), got {max_offset!r}")
        if not hidden or any(int(h) < 1 for h in hidden):
            raise ValueError(f"hidden must be a non-empty list of positive widths, got {hidden}")
        layers: list[nn.Module] = []
        width = 24
        for h in hidden:
            layers += [nn.Linear(width, int(h)), nn.Tanh()]
            width = int(h)
        last = nn.Linear(width, 3)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.net = nn.Sequential(*layers, last)
        self.max_offset = float(max_offset)
        self.register_buffer("home", torch.tensor(np.array(HOME), dtype=torch.float32))

    def forward(self, observation: Tensor, goal: Tensor, flange: Tensor) -> Tensor:
        if observation.dim() != 2 or observation.shape[-1] != OBS_DIM:
            raise ValueError(f"observation must have shape (B, {OBS_DIM}) = [qpos; qvel; "
                             f"obstacle centre; obstacle radius], got {tuple(observation.shape)}")
        B = observation.shape[0]
        if goal.shape != (B, 3) or flange.shape != (B, 3):
            raise ValueError(f"goal and flange must have shape (B, 3) = ({B}, 3), got "
                             f"{tuple(goal.shape)} and {tuple(flange.shape)}")
        q, v = observation[:, :7], observation[:, 7:14]
        center, radius = observation[:, 14:17], observation[:, 17:]
        features = torch.cat([q - self.home.to(q), v, flange, goal - flange, center - flange,
                              radius], -1)
        return goal + self.max_offset * torch.tanh(self.net(features))


class MPCGoalPolicy(L.LightningModule):
    """Train a :class:`TargetPolicy` through a :class:`PandaTargetMPC` (see the module
    docstring).

    Args:
        env_id, env_kwargs: the environment (dict observations whose ``observation`` is
            ``[qpos; qvel; obstacle centre; obstacle radius]``, e.g.
            ``diffto/PandaObstacleReach-v0``); its episodes give the training starts and the
            validation episodes.
        horizon, position_weight, velocity_weight, control_weight, posture_weight,
            terminal_weight: the MPC's (:class:`PandaTargetMPC`).
        via_steps: control steps the MPC aims at the via-point before it aims at the goal
            (a multiple of ``target_every``).
        target_every: control steps of one plan in the training rollout (planned open loop
            before the model is relinearized); at most ``horizon``.
        rollout_steps: control steps of the training rollout (a multiple of ``target_every``).
        hidden, max_offset: the policy network's widths and its largest offset (m) per axis.
        batch_size: episode starts per training step.
        train_configurations: episode starts drawn once from seeds ``0 …`` (an epoch).
        lr: Adam's learning rate.
        margin: metres beyond the keep-out sphere (radius + the env's ``flange_radius``) the
            training loss keeps the path.
        obstacle_weight, goal_weight: see :func:`obstacle_reach_loss`.
        eval_episodes: held-out episodes per validation (seeds ``EVAL_SEED_BASE + j``).
        report_episodes: episodes of the end-of-fit report, seeded after the validation ones
            (``0``: no report).
        video_episodes: episodes of the learned policy rendered into ``final.mp4``.
        refine_steps: Adam steps on each episode's via-point through its model rollout before
            the closed loop of the report's refined row (``0``: no refined row).
        refine_lr: their learning rate (m).
        dtype: of the MPC solves and the policy in training.
    """

    def __init__(
        self,
        env_id: str = "diffto/PandaObstacleReach-v0",
        env_kwargs: dict[str, Any] | None = None,
        horizon: int = 20,
        position_weight: float = 100.0,
        velocity_weight: float = 1.0,
        control_weight: float = 0.1,
        posture_weight: float = 0.1,
        terminal_weight: float = 5.0,
        via_steps: int = 10,
        target_every: int = 10,
        rollout_steps: int = 100,
        hidden: list[int] | None = None,
        max_offset: float = 0.3,
        batch_size: int = 32,
        train_configurations: int = 2048,
        lr: float = 1e-3,
        margin: float = 0.03,
        obstacle_weight: float = 100.0,
        goal_weight: float = 1.0,
        eval_episodes: int = 16,
        report_episodes: int = 50,
        video_episodes: int = 2,
        refine_steps: int = 0,
        refine_lr: float = 0.01,
        dtype: Literal["float32", "float64"] = "float32",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        for name, value in (("target_every", target_every), ("rollout_steps", rollout_steps),
                            ("batch_size", batch_size),
                            ("train_configurations", train_configurations),
                            ("eval_episodes", eval_episodes)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        for name, value in (("report_episodes", report_episodes),
                            ("video_episodes", video_episodes), ("refine_steps", refine_steps)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if target_every > horizon:
            raise ValueError(f"target_every must be <= horizon ({horizon}): a target is held "
                             f"along one plan, got {target_every}")
        if not isinstance(via_steps, int) or via_steps < 0 or via_steps % target_every:
            raise ValueError(f"via_steps must be an int >= 0 and a multiple of target_every "
                             f"({target_every}), got {via_steps!r}")
        if rollout_steps % target_every:
            raise ValueError(f"rollout_steps must be a multiple of target_every "
                             f"({target_every}), got {rollout_steps}")
        if dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
        for name, value in (("lr", lr), ("obstacle_weight", obstacle_weight),
                            ("goal_weight", goal_weight), ("refine_lr", refine_lr)):
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value!r}")
        if refine_steps > 0 and via_steps == 0:
            raise ValueError(f"refine_steps must be 0 when via_steps is 0 (no via-point to "
                             f"refine), got {refine_steps}")
        if not margin >= 0:
            raise ValueError(f"margin must be >= 0 (m), got {margin!r}")
        self.mpc = PandaTargetMPC(horizon, position_weight=position_weight,
                                  velocity_weight=velocity_weight, control_weight=control_weight,
                                  posture_weight=posture_weight, terminal_weight=terminal_weight)
        self.policy = TargetPolicy(tuple(hidden or (128, 128)), max_offset)
        self._dtype = getattr(torch, dtype)
        self.policy.to(self._dtype)
        env = make_env(env_id, env_kwargs)
        try:
            obs_space = env.observation_space["observation"]
            self.flange_radius = float(getattr(env.unwrapped, "flange_radius", 0.0))
            self.control_dt = float(getattr(env.unwrapped, "control_dt", 0.02))
        finally:
            env.close()
        if obs_space.shape != (OBS_DIM,):
            raise ValueError(f"env_id {env_id!r} must observe [qpos; qvel; obstacle centre; "
                             f"obstacle radius] ({OBS_DIM},), got {obs_space.shape}")
        if abs(self.control_dt - self.mpc.control_dt) > 1e-12:
            raise ValueError(f"the env's control step {self.control_dt} s must be the MPC's "
                             f"{self.mpc.control_dt} s (env_kwargs substeps)")
        self._starts: TensorDataset | None = None
        self._timer = {"start": time.perf_counter(), "mpc_forward": 0.0, "mpc_backward": 0.0}
        self.wall_time = 0.0

    # ------------------------------------------------------------------ data
    def episode_starts(self, seeds: range | list[int]) -> TensorDataset:
        """``(observation (N, 18), goal (N, 3))`` of the env's episodes reset on ``seeds``."""
        env = make_env(self.hparams.env_id, self.hparams.env_kwargs)
        try:
            obs = [env.reset(seed=int(s))[0] for s in seeds]
        finally:
            env.close()
        return TensorDataset(torch.as_tensor(np.stack([o["observation"] for o in obs])),
                             torch.as_tensor(np.stack([o["desired_goal"] for o in obs])))

    def train_dataloader(self) -> DataLoader:
        if self._starts is None:
            self._starts = self.episode_starts(range(self.hparams.train_configurations))
        return DataLoader(self._starts, batch_size=self.hparams.batch_size, shuffle=True,
                          drop_last=len(self._starts) >= self.hparams.batch_size)

    def val_dataloader(self) -> DataLoader:
        return DataLoader([0], batch_size=1)  # one validation step runs every episode

    # ------------------------------------------------------------------ the rollout
    def via_point(self, observation: Tensor, goal: Tensor) -> Tensor:
        """The policy's via-point ``(B, 3)`` for ``observation (B, 18)``, ``goal (B, 3)``."""
        flange = self.mpc.flange(observation[:, :7].to(torch.float64)).to(observation.dtype)
        return self.policy(observation, goal, flange)

    def rollout(self, observation: Tensor, goal: Tensor, via: Tensor | None = None) -> Tensor:
        """Differentiable closed-loop model rollout from episode starts; flange path
        ``(B, rollout_steps, 3)`` (see the module docstring). ``via (B, 3)``: the via-point
        to follow instead of the policy's."""
        hp = self.hparams
        obs = observation.to(self._dtype)
        goal = goal.to(self._dtype)
        x = obs[:, :14]
        w = self.via_point(obs, goal) if via is None else via.to(self._dtype)
        path = []
        for j in range(hp.rollout_steps // hp.target_every):
            # A fresh node per segment, so that its gradient is complete right after this
            # solve's backward (the timing hooks read that moment).
            r = (w if j * hp.target_every < hp.via_steps else goal).clone()
            t0 = time.perf_counter()
            sol = self.mpc(x, r)
            self._timer["mpc_forward"] += time.perf_counter() - t0
            if r.requires_grad or x.requires_grad:
                self._time_backward(sol.x, r if r.requires_grad else x)
            states = sol.x[:, 1:hp.target_every + 1]  # (B, R, 14)
            path.append(self.mpc.flange(states.to(torch.float64)).to(self._dtype))
            x = sol.x[:, hp.target_every]
        return torch.cat(path, 1)

    def _time_backward(self, plan: Tensor, target: Tensor) -> None:
        marks: dict[str, float] = {}

        def plan_ready(grad: Tensor) -> None:
            marks["start"] = time.perf_counter()

        def target_ready(grad: Tensor) -> None:
            if "start" in marks:
                self._timer["mpc_backward"] += time.perf_counter() - marks.pop("start")

        plan.register_hook(plan_ready)
        target.register_hook(target_ready)

    def losses(self, batch: tuple[Tensor, Tensor], via: Tensor | None = None
               ) -> dict[str, Tensor]:
        """:func:`obstacle_reach_loss` of the rollout from a batch of episode starts (following
        ``via (B, 3)`` instead of the policy's via-point where given)."""
        observation, goal = batch
        path = self.rollout(observation, goal, via)
        obs = observation.to(path.dtype)
        return obstacle_reach_loss(path, goal.to(path.dtype), obs[:, 14:17], obs[:, 17],
                                   self.flange_radius + self.hparams.margin,
                                   self.hparams.obstacle_weight, self.hparams.goal_weight)

    def refine(self, observation: Tensor, goal: Tensor, steps: int) -> Tensor:
        """The policy's via-points ``(B, 3)`` for episode starts ``observation (B, 18)``,
        ``goal (B, 3)``, each improved by ``steps`` Adam steps on its own episode's model-
        rollout loss and kept inside ``goal ± max_offset`` (see the module docstring); each
        episode gets the iterate of lowest loss, the policy's own via-point included, so
        refinement never ends worse in the model than it started. The loss is the batch mean
        of independent rows, and Adam's steps do not depend on the gradient's scale, so each
        via-point moves as it would alone. The training-step timer is left as it was."""
        if torch.is_inference_mode_enabled():
            raise RuntimeError("MPCGoalPolicy.refine differentiates the model rollout: call it "
                               "outside torch.inference_mode() (e.g. from the fit loop, or "
                               "with Trainer(inference_mode=False))")
        obs = observation.to(self._dtype)
        goal = goal.to(self._dtype)
        with torch.no_grad():
            via = self.via_point(obs, goal)
        if steps == 0:
            return via
        low = goal - self.hparams.max_offset
        high = goal + self.hparams.max_offset
        best, best_loss = via.clone(), torch.full(goal.shape[:1], torch.inf, dtype=goal.dtype)
        timer = dict(self._timer)
        via.requires_grad_(True)
        opt = torch.optim.Adam([via], lr=self.hparams.refine_lr)
        with torch.enable_grad():
            for k in range(steps + 1):
                with torch.set_grad_enabled(k < steps):  # the last iterate is only scored
                    out = self.losses((obs, goal), via)
                with torch.no_grad():
                    better = out["row_loss"] < best_loss
                    best[better], best_loss[better] = via[better], out["row_loss"][better]
                if k == steps:
                    break
                opt.zero_grad()
                out["loss"].backward()
                opt.step()
                with torch.no_grad():
                    via.copy_(torch.minimum(torch.maximum(via, low), high))
        self._timer = timer
        return best

    # ------------------------------------------------------------------ training
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._timer = {"start": time.perf_counter(), "mpc_forward": 0.0, "mpc_backward": 0.0}

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        out = self.losses(batch)
        B = batch[0].shape[0]
        self.log_dict({f"train/{k}": v.detach() for k, v in out.items() if v.dim() == 0},
                      batch_size=B, prog_bar=False, on_step=True, on_epoch=False)
        self.log("train/plan_collision", out["collision"], prog_bar=True, batch_size=B)
        return out["loss"]

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = time.perf_counter() - self._timer["start"]
        self.wall_time += step
        mpc = self._timer["mpc_forward"] + self._timer["mpc_backward"]
        self.log_dict({"time/step_s": step, "time/mpc_forward_s": self._timer["mpc_forward"],
                       "time/mpc_backward_s": self._timer["mpc_backward"],
                       "time/mpc_share": mpc / step, "time/train_s": self.wall_time},
                      on_step=True, on_epoch=False, batch_size=1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.policy.parameters(), lr=self.hparams.lr)

    # ------------------------------------------------------------------ closed loop
    def evaluate(self, episodes: int, offset: int = 0, video_episodes: int = 0,
                 direct: bool = False, refine_steps: int = 0
                 ) -> tuple[dict[str, float], list[np.ndarray]]:
        """Closed-loop episodes in the environment (seeds ``EVAL_SEED_BASE + offset + j``);
        ``direct``: the MPC aimed at the goal (no policy); ``refine_steps``: the policy's
        via-points refined first (:meth:`refine`). Returns the summary (with ``collision``,
        the share of episodes that hit the obstacle, and ``refine_s``: the refinement's wall
        time, run once for all episodes as one batch, divided by their number) and video
        frames."""
        hp = self.hparams
        state: dict[str, Any] = {"k": 0, "via": None, "envs": [], "refine_s": 0.0}

        @torch.no_grad()
        def controller(observation: np.ndarray, goal: np.ndarray, envs: list) -> np.ndarray:
            state["envs"] = envs
            if state["k"] == 0:
                obs = torch.as_tensor(observation, dtype=self._dtype)
                g = torch.as_tensor(goal, dtype=self._dtype)
                if direct:
                    state["via"] = goal
                elif refine_steps > 0:
                    t0 = time.perf_counter()
                    state["via"] = self.refine(obs, g, refine_steps).double().numpy()
                    state["refine_s"] = (time.perf_counter() - t0) / len(goal)
                else:
                    state["via"] = self.via_point(obs, g).double().numpy()
            target = state["via"] if state["k"] < hp.via_steps else goal
            state["k"] += 1
            return self.mpc.act(observation[:, :14], target)

        was_training = self.training
        self.eval()
        try:
            result, frames = rollout_episodes(controller, hp.env_id, eval_seeds(episodes, offset),
                                              hp.env_kwargs, video_episodes=video_episodes)
        finally:
            self.train(was_training)
        summary = result.summary()
        summary["collision"] = float(np.mean([bool(getattr(e, "collided", False))
                                              for e in state["envs"]]))
        summary["refine_s"] = state["refine_s"]
        return summary, frames

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        s, _ = self.evaluate(self.hparams.eval_episodes)
        self.log_dict({"val/success": s["success"], "val/success_any": s["success_any"],
                       "val/collision": s["collision"], "val/final_distance": s["final_distance"],
                       "val/train_s": self.wall_time}, prog_bar=True, batch_size=1)

    # ------------------------------------------------------------------ the report
    def on_fit_end(self) -> None:
        if self.trainer.is_global_zero and self.hparams.report_episodes > 0:
            self.write_report(Path(self.trainer.log_dir or self.trainer.default_root_dir))

    def write_report(self, out: Path) -> dict[str, Any]:
        """The learned policy (final and best checkpoints) next to the MPC aimed straight at
        the goal, on ``report_episodes`` held-out episodes seeded after the validation ones;
        ``report.json``, ``report.md`` and ``final.mp4``."""
        hp = self.hparams
        n, offset = hp.report_episodes, hp.eval_episodes
        rows: dict[str, dict[str, float]] = {"direct MPC (target = goal)": self.evaluate(
            n, offset, direct=True)[0]}
        best_path = None
        for cb in self.trainer.checkpoint_callbacks:
            path = getattr(cb, "best_model_path", "")
            if getattr(cb, "monitor", None) == "val/success" and path and Path(path).exists():
                best_path = path
        if best_path is not None:
            saved = {k: v.clone() for k, v in self.policy.state_dict().items()}
            ckpt = torch.load(best_path, map_location="cpu", weights_only=False)
            self.load_state_dict(ckpt["state_dict"])
            rows["learned target, best checkpoint"] = self.evaluate(n, offset)[0]
            self.policy.load_state_dict(saved)
        rows["learned target, final"], frames = self.evaluate(n, offset, hp.video_episodes)
        if hp.refine_steps > 0:
            name = f"learned target, final, refined (Adam steps: {hp.refine_steps})"
            rows[name] = self.evaluate(n, offset, refine_steps=hp.refine_steps)[0]
        video = None
        if frames:
            fps = make_env_fps(hp.env_id, dict(hp.env_kwargs or {}))
            video = str(save_video(frames, out / "final.mp4", fps=int(fps)))
        lines = [f"### MPCGoalPolicy on {hp.env_id}: {n} held-out episodes, "
                 f"{self.global_step} training steps ({self.wall_time / 60:.1f} min, no "
                 f"environment steps)", "",
                 "| controller | success (last step) | success (any step) | collision | "
                 "final distance (m) | steps to success | refinement (batch s / episodes) |",
                 "|---|---|---|---|---|---|---|"]
        for name, s in rows.items():
            refine = f"{s['refine_s']:.2f}" if s["refine_s"] else "—"
            lines.append(f"| {name} | {s['success']:.2f} | {s['success_any']:.2f} | "
                         f"{s['collision']:.2f} | {s['final_distance']:.3f} | "
                         f"{s['steps_to_success']:.1f} | {refine} |")
        payload = {"env_id": hp.env_id, "env_kwargs": hp.env_kwargs, "episodes": n,
                   "seeds": eval_seeds(n, offset), "env_steps": 0,
                   "training_steps": int(self.global_step), "training_time_s": self.wall_time,
                   "best_checkpoint": best_path, "video": video, "results": rows}
        out.mkdir(parents=True, exist_ok=True)
        _write_json(out / "report.json", payload)
        (out / "report.md").write_text("\n".join(lines) + "\n")
        rank_zero_info("\n".join(lines))
        return payload
