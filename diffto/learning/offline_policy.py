"""Offline policies from demonstrations, evaluated in their environments: the shared module.

:class:`OfflinePolicy` is the LightningModule that behaviour cloning
(:class:`~diffto.learning.bc.BehaviorCloning`) and the diffusion policy
(:class:`~diffto.learning.diffusion_policy.DiffusionPolicy`) share. A subclass defines the
network (:meth:`OfflinePolicy.build`), its loss on a minibatch of windows
(:meth:`OfflinePolicy.compute_loss`) and its action chunk for a batch of observation
histories (:meth:`OfflinePolicy.predict_chunk`); this module does everything around them:

**Inputs.** The policy reads the last ``obs_horizon`` observations (the entries
``observation_keys`` of the environment's dict, concatenated), each with the differences
``o[j : j+k] − o[i : i+k]`` named by ``input_differences`` (e.g. Metaworld's hand-to-object,
object-to-goal and hand-to-goal vectors), and, when it learns several tasks, the one-hot of
its task in ``tasks`` (:meth:`OfflinePolicy.inputs`): one multi-task policy is a
task-conditioned policy. A manipulation action depends mostly on where the object and the
goal lie *relative to the hand*; the network would otherwise form those vectors from
separately normalized absolute positions, which takes many demonstrations.

**Acting.** :class:`ChunkController` keeps, per environment, the observation history and
the queue of planned actions: every ``action_steps`` steps it asks the policy for a chunk
of ``action_horizon`` actions and executes the first ``action_steps`` (receding-horizon
chunking; ``1, 1`` is an ordinary policy). At an episode's start the history is the first
observation repeated, as in training.

**Validation** (every ``check_val_every_n_epoch`` epochs): the policy in closed loop on
``eval_episodes`` held-out episodes (reset seeds ``EVAL_SEED_BASE + j``: goal and object
positions that no demonstration had) of every task, logged as ``val/success`` (the mean over
tasks, what checkpoints monitor), ``val/steps_to_success`` and ``val/success/<task>``.

**Report** (end of fit): the expert, the best checkpoint (by ``val/success``) and the last
weights on ``report_episodes`` held-out episodes per task, a per-task table in
``report.md`` / ``report.json`` in the run's log folder, the time per action of each, and a
video of the last weights (``video_episodes`` per task side by side, the tasks one after
another; skipped with a warning where rendering is unavailable).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from diffto.learning.gcbc import adamw_with_schedule
from diffto.learning.goal_evaluation import (
    Evaluation,
    _write_json,
    eval_seeds,
    make_env_fps,
    save_video,
)
from diffto.learning.task_evaluation import (
    evaluate_on_tasks,
    evaluate_task_experts,
    format_task_table,
    mean_summary,
)
from diffto.tasks.registry import make_env

__all__ = ["OfflinePolicy", "ChunkController"]


class ChunkController:
    """Per-environment observation history and action queue around a chunk predictor.

    Args:
        predict: ``(history (B, T_o, o) float32 tensor, task (B,) int64 tensor) -> actions
            (B, T_a, a)``.
        obs_horizon: ``T_o``; action_steps: actions executed per prediction (``<= T_a``).
        task: the task index of every row (one task per evaluation batch).
    """

    def __init__(self, predict: Callable[[Tensor, Tensor], Tensor], obs_horizon: int,
                 action_steps: int, task: int) -> None:
        self.predict, self.obs_horizon, self.action_steps = predict, obs_horizon, action_steps
        self.task = task
        self.reset()

    def reset(self) -> None:
        self.history: np.ndarray | None = None
        self.queue: np.ndarray | None = None
        self.step = 0

    def __call__(self, observation: np.ndarray, goal: np.ndarray | None = None,
                 envs: Sequence[Any] | None = None) -> np.ndarray:
        obs = np.asarray(observation, np.float32)
        if self.history is None:  # episode start: the first observation repeated
            self.history = np.repeat(obs[:, None], self.obs_horizon, 1)
        else:
            self.history = np.concatenate([self.history[:, 1:], obs[:, None]], 1)
        if self.step % self.action_steps == 0:
            task = torch.full((len(obs),), self.task, dtype=torch.long)
            chunk = self.predict(torch.as_tensor(self.history), task)
            self.queue = chunk.detach().cpu().numpy()
        assert self.queue is not None
        action = self.queue[:, self.step % self.action_steps]
        self.step += 1
        return action


class OfflinePolicy(L.LightningModule):
    """The shared part of offline policies: inputs, acting, evaluation, report.

    Args:
        env_id: gymnasium id of the environment family (``diffto.tasks.registry``).
        tasks: the tasks the policy learns, by name (the order is the one-hot's); ``None``: a
            single-task environment without a task argument.
        env_kwargs: keyword arguments of the evaluation environments (e.g.
            ``{"terminate_on_success": true}`` so an episode ends at its first success).
        task_kwarg: the environment's keyword argument that selects the task.
        observation_keys: the dict entries the policy observes, concatenated.
        input_differences: ``[i, j, k]`` triples: each observation gains ``o[j : j+k] −
            o[i : i+k]`` (the vector from the slice at ``i`` to the slice at ``j``).
        input_indices: the entries of each frame (the observation followed by its
            differences, ``o + D`` numbers) that the network reads, in this order; ``None``:
            all. Keeping only differences and a few heights makes a policy invariant to where
            the scene sits, which is what lets it generalize from few demonstrations.
        obs_horizon: observations the policy reads (the current one and ``obs_horizon - 1``
            before it).
        action_horizon: actions the policy predicts per call; ``action_steps``: how many of
            them are executed before the next call (``<= action_horizon``).
        lr, weight_decay, lr_schedule: AdamW and a cosine decay to zero over the run's
            optimizer steps (``"constant"``: none).
        eval_episodes: held-out episodes per task at each validation.
        report_episodes: held-out episodes per task in the end-of-fit report (same seeds for
            the expert, the best and the last checkpoint).
        eval_max_steps: cap on an evaluation episode's length (``None``: the environment's).
        expert: the task expert ``{class_path, init_args}``, built with ``task=<name>``, whose
            ``act(observation (B, o))`` drives the baseline; ``None``: no expert row.
        expert_cache_dir: where the expert's evaluations are cached (``None``: no cache).
        report: write the end-of-fit report; video_episodes: episodes of each task filmed
            for it, side by side, the tasks one after another (0: none).
    """

    def __init__(
        self,
        env_id: str,
        tasks: list[str] | None = None,
        env_kwargs: dict[str, Any] | None = None,
        task_kwarg: str = "task",
        observation_keys: list[str] | None = None,
        input_differences: list[list[int]] | None = None,
        input_indices: list[int] | None = None,
        obs_horizon: int = 1,
        action_horizon: int = 1,
        action_steps: int = 1,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        lr_schedule: Literal["cosine", "constant"] = "cosine",
        eval_episodes: int = 10,
        report_episodes: int = 50,
        eval_max_steps: int | None = None,
        expert: dict[str, Any] | None = None,
        expert_cache_dir: str | None = "runs/expert_cache",
        report: bool = True,
        video_episodes: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()  # the subclass's arguments too (Lightning walks the frames)
        for name, value in (("obs_horizon", obs_horizon), ("action_horizon", action_horizon),
                            ("action_steps", action_steps), ("eval_episodes", eval_episodes),
                            ("report_episodes", report_episodes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if action_steps > action_horizon:
            raise ValueError(f"action_steps must be <= action_horizon ({action_horizon}), got "
                             f"{action_steps}")
        if lr <= 0 or weight_decay < 0:
            raise ValueError(f"lr must be > 0 and weight_decay >= 0, got {lr}, {weight_decay}")
        if lr_schedule not in ("cosine", "constant"):
            raise ValueError(f"lr_schedule must be 'cosine' or 'constant', got {lr_schedule!r}")
        if video_episodes < 0:
            raise ValueError(f"video_episodes must be >= 0, got {video_episodes}")
        if tasks is not None and (not tasks or len(set(tasks)) != len(tasks)):
            raise ValueError(f"tasks must be a non-empty list of distinct names, got {tasks}")
        self.tasks = None if tasks is None else list(tasks)
        self.env_kwargs = dict(env_kwargs or {})
        self.observation_keys = tuple(observation_keys or ("observation",))
        self.obs_horizon, self.action_horizon = obs_horizon, action_horizon
        self.action_steps = action_steps
        obs_dim, low, high = self._spaces()
        self.obs_dim, self.act_dim = obs_dim, len(low)
        self.differences = [tuple(d) for d in (input_differences or [])]
        for d in self.differences:
            if (len(d) != 3 or any(isinstance(v, bool) or not isinstance(v, int) for v in d)
                    or d[2] < 1 or min(d[0], d[1]) < 0 or max(d[0], d[1]) + d[2] > obs_dim):
                raise ValueError(f"input_differences must be [i, j, k] triples of slices inside "
                                 f"the {obs_dim}-dimensional observation, got {list(d)}")
        full = obs_dim + sum(d[2] for d in self.differences)
        self.input_indices = None if input_indices is None else list(input_indices)
        if self.input_indices is not None and (
                not self.input_indices
                or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < full
                       for i in self.input_indices)
                or len(set(self.input_indices)) != len(self.input_indices)):
            raise ValueError(f"input_indices must be distinct ints in [0, {full}) (the "
                             f"observation and its differences), got {input_indices}")
        self.frame_dim = full if self.input_indices is None else len(self.input_indices)
        self.n_tasks = len(self.tasks) if self.tasks and len(self.tasks) > 1 else 0
        self.input_dim = obs_horizon * self.frame_dim + self.n_tasks
        self.register_buffer("action_low", torch.as_tensor(low, dtype=torch.float32))
        self.register_buffer("action_high", torch.as_tensor(high, dtype=torch.float32))
        self._expert_eval: dict[str, Evaluation] | None = None

    # ------------------------------------------------------------------ spaces and inputs
    def task_list(self) -> list[str | None]:
        """The tasks in one-hot order (``[None]`` for an environment without tasks)."""
        return list(self.tasks) if self.tasks else [None]

    def task_env_kwargs(self, task: str | None) -> dict[str, Any]:
        """The evaluation environment's keyword arguments for ``task``."""
        return self.env_kwargs if task is None else {**self.env_kwargs,
                                                     self.hparams.task_kwarg: task}

    def _spaces(self) -> tuple[int, np.ndarray, np.ndarray]:
        """``(obs_dim, action_low, action_high)`` from the first task's environment."""
        env = make_env(self.hparams.env_id, self.task_env_kwargs(self.task_list()[0]))
        try:
            space, act = env.observation_space, env.action_space
            if hasattr(space, "spaces"):
                unknown = [k for k in self.observation_keys if k not in space.spaces]
                if unknown:
                    raise ValueError(f"observation_keys {unknown} are not entries of "
                                     f"{self.hparams.env_id}'s observations {list(space.spaces)}")
                obs_dim = sum(int(np.prod(space[k].shape)) for k in self.observation_keys)
            else:
                obs_dim = int(np.prod(space.shape))
            return obs_dim, np.asarray(act.low, np.float32), np.asarray(act.high, np.float32)
        finally:
            env.close()

    def inputs(self, history: Tensor, task: Tensor) -> Tensor:
        """The network input ``(B, T_o·F + K)``: the raw observation history ``(B, T_o, o)``
        with each frame's ``D`` differences (``F = o + D`` numbers, or the ``input_indices``
        among them), flattened, then the one-hot of ``task (B,)`` over the ``K`` tasks (none
        for one)."""
        history = history.to(self.action_low)
        if self.differences:
            history = torch.cat([history] + [history[..., j:j + k] - history[..., i:i + k]
                                             for i, j, k in self.differences], -1)
        if self.input_indices is not None:
            history = history[..., self.input_indices]
        x = history.reshape(history.shape[0], -1)
        if self.n_tasks:
            x = torch.cat([x, nn.functional.one_hot(task.long(), self.n_tasks).to(x)], -1)
        return x

    def to_unit(self, action: Tensor) -> Tensor:
        """Actions in the box -> ``[-1, 1]`` per dimension (clipped to the box first)."""
        lo, hi = self.action_low, self.action_high
        return (2 * (action.clamp(lo, hi) - lo) / (hi - lo) - 1).to(lo)

    def from_unit(self, unit: Tensor) -> Tensor:
        """``[-1, 1]`` -> the action box."""
        lo, hi = self.action_low, self.action_high
        return lo + (unit.clamp(-1, 1) + 1) * (hi - lo) / 2

    # ------------------------------------------------------------------ subclass hooks
    def fit_inputs(self, inputs: Tensor) -> None:
        """Fit input statistics from the training inputs ``(N, d)`` (once; checkpoints keep
        them)."""
        raise NotImplementedError

    def inputs_fitted(self) -> bool:
        raise NotImplementedError

    def compute_loss(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """``{"loss": scalar, ...}`` on a window batch (``observation (B, T_o, o)``, ``action
        (B, T_a, a)``, ``task (B,)``)."""
        raise NotImplementedError

    def predict_chunk(self, history: Tensor, task: Tensor) -> Tensor:
        """Actions ``(B, T_a, a)`` in the box for raw histories ``(B, T_o, o)``."""
        raise NotImplementedError

    # ------------------------------------------------------------------ data hooks
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        windows = getattr(dm, "windows", None)
        if windows is None:
            return
        env_id = dm.train_set.meta.get("env_id")
        if isinstance(env_id, str) and env_id != self.hparams.env_id:
            raise ValueError(f"the dataset was made on {env_id!r} but the model's env_id is "
                             f"{self.hparams.env_id!r}")
        if windows.observation.shape[1] != self.obs_dim or windows.action.shape[1] != (
                self.act_dim):
            raise ValueError(f"the dataset's observation ({windows.observation.shape[1]},) / "
                             f"action ({windows.action.shape[1]},) do not match the "
                             f"environment's ({self.obs_dim},) / ({self.act_dim},)")
        if not self.inputs_fitted():  # a restored checkpoint keeps its statistics
            hist = windows.observation[windows.hist]
            self.fit_inputs(self.inputs(hist, windows.task))

    # ------------------------------------------------------------------ optimization
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        terms = self.compute_loss(batch)
        B = batch["observation"].shape[0]
        for k, v in terms.items():
            self.log(f"train/{k}", v, prog_bar=k == "loss", batch_size=B)
        return terms["loss"]

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        return adamw_with_schedule(self.parameters(), hp.lr, hp.weight_decay, hp.lr_schedule,
                                   self.trainer)

    # ------------------------------------------------------------------ evaluation
    def controller_factory(self, policy: OfflinePolicy | None = None):
        """``task -> (ChunkController, its reset)`` for ``policy`` (default: this module)."""
        pol = self if policy is None else policy
        index = {t: k for k, t in enumerate(self.task_list())}

        def make(task: str | None):
            ctrl = ChunkController(pol.predict_chunk, self.obs_horizon, self.action_steps,
                                   index[task])
            return ctrl, ctrl.reset

        return make

    def evaluate(self, policy: OfflinePolicy | None = None, episodes: int | None = None,
                 video_episodes: int = 0, progress: bool = False,
                 tasks: Sequence[str] | None = None
                 ) -> tuple[dict[str, Evaluation], dict[str, list[np.ndarray]]]:
        """``policy`` (default: this module) in closed loop on the held-out seeds of every
        task (or of ``tasks``, a subset of its tasks); each Evaluation's
        ``timing["time_per_action_s"]`` is one policy call on a batch of one divided by the
        actions it yields."""
        pol = self if policy is None else policy
        was_training = pol.training
        pol.eval()
        try:
            with torch.no_grad():
                results, videos = evaluate_on_tasks(
                    self.controller_factory(pol), self.hparams.env_id,
                    self.task_list() if tasks is None else list(tasks),
                    eval_seeds(episodes or self.hparams.eval_episodes), self.env_kwargs,
                    self.hparams.task_kwarg, self.hparams.eval_max_steps, video_episodes,
                    progress, self.observation_keys)
                per_action = self.time_per_action(pol)
        finally:
            pol.train(was_training)
        for r in results.values():
            r.timing["time_per_action_s"] = per_action
        return results, videos

    def time_per_action(self, policy: OfflinePolicy | None = None, repeats: int = 20) -> float:
        """Median wall time of one prediction on a batch of one, per executed action."""
        pol = self if policy is None else policy
        hist = torch.zeros(1, self.obs_horizon, self.obs_dim, device=self.action_low.device)
        task = torch.zeros(1, dtype=torch.long, device=self.action_low.device)
        times = []
        with torch.no_grad():
            for _ in range(repeats + 3):
                t0 = time.perf_counter()
                pol.predict_chunk(hist, task)
                times.append(time.perf_counter() - t0)
        return float(np.median(times[3:])) / self.action_steps

    def expert_evaluation(self, episodes: int) -> dict[str, Evaluation] | None:
        """The task experts on the first ``episodes`` held-out seeds (cached on disk)."""
        hp = self.hparams
        if hp.expert is None:
            return None
        return evaluate_task_experts(hp.env_id, self.task_list(), eval_seeds(episodes),
                                     hp.expert, self.env_kwargs, hp.task_kwarg,
                                     hp.eval_max_steps, hp.expert_cache_dir)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        return None  # validation is the closed-loop evaluation at the epoch's end

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        results, _ = self.evaluate()
        mean = mean_summary(results)
        self.log("val/success", mean["success"], prog_bar=True, batch_size=1)
        self.log("val/steps_to_success", mean["steps_to_success"], batch_size=1)
        for task, r in results.items():
            self.log(f"val/success/{task}", r.summary()["success"], batch_size=1)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # which class to rebuild (diffto.learning.evaluate_offline reads it)
        checkpoint["diffto_offline_policy"] = f"{type(self).__module__}.{type(self).__qualname__}"

    # ------------------------------------------------------------------ report
    def _best_policy(self) -> tuple[OfflinePolicy | None, str | None]:
        for cb in self.trainer.checkpoint_callbacks:
            if (isinstance(cb, ModelCheckpoint) and cb.monitor == "val/success"
                    and cb.best_model_path and os.path.exists(cb.best_model_path)):
                ckpt = torch.load(cb.best_model_path, map_location=self.device,
                                  weights_only=False)
                # the constructor's arguments (the CLI adds private keys such as _class_path)
                best = type(self)(**{k: v for k, v in self.hparams.items()
                                     if not k.startswith("_")})
                best.load_state_dict(ckpt["state_dict"])
                return best.to(self.device), cb.best_model_path
        return None, None

    def on_fit_end(self) -> None:
        if not self.hparams.report or not self.trainer.is_global_zero:
            return
        out_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        episodes = self.hparams.report_episodes
        rows: dict[str, dict[str, Evaluation]] = {}
        expert = self.expert_evaluation(episodes)
        if expert is not None:
            rows["expert"] = expert
        best, best_path = self._best_policy()
        if best is not None:
            rows["best checkpoint"] = self.evaluate(best, episodes)[0]
        rows["last checkpoint"], videos = self.evaluate(
            episodes=episodes, video_episodes=self.hparams.video_episodes)
        video = None
        if videos:  # the tasks one after another
            frames = [f for clip in videos.values() for f in clip]
            fps = make_env_fps(self.hparams.env_id, self.task_env_kwargs(next(iter(videos))))
            video = str(save_video(frames, out_dir / "last.mp4", fps=int(fps)))
        name = type(self).__name__
        title = (f"{name} on {self.hparams.env_id}: success over {episodes} held-out episodes "
                 f"per task")
        table = format_task_table({k: {str(t): e for t, e in v.items()} for k, v in rows.items()},
                                  expert="expert" if expert is not None else None, title=title)
        timing = {k: next(iter(v.values())).timing.get("time_per_action_s")
                  for k, v in rows.items()}
        table += "\ntime per action: " + ", ".join(
            f"{k} {v * 1e3:.3g} ms" for k, v in timing.items() if v is not None) + "\n"
        payload = {"env_id": self.hparams.env_id, "env_kwargs": self.env_kwargs,
                   "tasks": self.task_list(), "episodes": episodes,
                   "best_checkpoint": best_path, "epochs": self.current_epoch, "video": video,
                   "demonstrations": _demo_count(self), "time_per_action_s": timing,
                   "results": {k: {str(t): e.summary() for t, e in v.items()}
                               for k, v in rows.items()},
                   "mean": {k: mean_summary(v) for k, v in rows.items()}}
        _write_json(out_dir / "report.json", payload)
        (out_dir / "report.md").write_text(table)
        rank_zero_info(table + f"(report: {out_dir / 'report.json'})")


def _demo_count(module: OfflinePolicy) -> int | None:
    dm = getattr(module.trainer, "datamodule", None)
    data = getattr(dm, "train_set", None)
    return None if data is None else int(len(data.episode_ids()))
