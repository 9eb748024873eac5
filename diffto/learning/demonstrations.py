"""Expert demonstrations for offline policies: task selection, windows and minibatches.

A demonstration dataset is one :class:`~diffto.data.trajectories.TrajectorySet`, single- or
multi-task (``task`` ids with the id -> name table ``meta["task_names"]``, as written by
``lightning predict --config metaworld_experts.yaml``). An offline policy learns from
*windows* of it:

- the observation history ``o_{t-T_o+1} .. o_t`` ``(T_o, o)``: rows before the episode's
  first step repeat the first observation (the policy meets the same padding at an episode's
  start in closed loop);
- the action chunk ``a_t .. a_{t+T_a-1}`` ``(T_a, a)``: rows after the episode's last step
  repeat the last action (the demonstration was cut a few steps after success, where the
  expert holds still);
- the task index ``k`` of the row in the policy's task list (its one-hot position).

``T_o = T_a = 1`` is plain behaviour cloning; longer windows serve action-chunking policies
(the diffusion policy, chunked BC). The windows are index arrays computed once, so a minibatch
is one gather.

:func:`select_demonstrations` keeps the first ``demos_per_task`` episodes (by id, i.e. by
collection slot) of each task the policy learns: learners given 10, 50 or 100 demonstrations
see nested sets, and the same ones whatever else the file holds.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler

from diffto.data.trajectories import TrajectorySet, load_trajectories

__all__ = [
    "task_names_of",
    "task_index",
    "select_demonstrations",
    "window_indices",
    "DemonstrationWindows",
    "DemonstrationsDataModule",
]


def task_names_of(data: TrajectorySet) -> dict[int, str]:
    """The dataset's task table ``{id: name}``: ``meta["task_names"]`` for a multi-task set,
    else ``{0: meta["task"] or meta["env_id"]}`` for a set without ``task`` ids."""
    if data.task is None:
        return {0: str(data.meta.get("task") or data.meta.get("env_id") or "task")}
    names = data.meta.get("task_names")
    if not isinstance(names, dict):
        raise ValueError("the dataset has task ids but no meta['task_names'] table "
                         "({id: name})")
    return {int(k): str(v) for k, v in names.items()}


def task_index(data: TrajectorySet, tasks: Sequence[str]) -> np.ndarray:
    """``(N,)`` int64 position of each row's task in ``tasks`` (the policy's task order)."""
    table = task_names_of(data)
    ids = np.zeros(len(data), np.int64) if data.task is None else data.task
    lookup = {name: k for k, name in enumerate(tasks)}
    out = np.full(len(data), -1, np.int64)
    for tid, name in table.items():
        if name in lookup:
            out[ids == tid] = lookup[name]
    if (out < 0).any():
        missing = sorted({table.get(int(t), f"id {t}") for t in np.unique(ids[out < 0])})
        raise ValueError(f"the dataset holds tasks {missing} that are not in tasks {list(tasks)}")
    return out


def select_demonstrations(data: TrajectorySet, tasks: Sequence[str] | None = None,
                          demos_per_task: int | None = None) -> tuple[TrajectorySet, list[str]]:
    """Keep the tasks ``tasks`` (default: all of the dataset's, in id order) and, of each, its
    first ``demos_per_task`` episodes by id (default: all). Returns the subset and the task
    list. A task with fewer episodes than asked is an error naming it."""
    table = task_names_of(data)
    if tasks is None:
        tasks = [table[k] for k in sorted(table)]
    tasks = list(tasks)
    if not tasks or len(set(tasks)) != len(tasks):
        raise ValueError(f"tasks must be distinct task names, got {tasks}")
    unknown = [t for t in tasks if t not in table.values()]
    if unknown:
        raise ValueError(f"tasks {unknown} are not in the dataset, which holds "
                         f"{sorted(table.values())}")
    if demos_per_task is not None and (isinstance(demos_per_task, bool) or demos_per_task < 1):
        raise ValueError(f"demos_per_task must be an int >= 1 or None, got {demos_per_task!r}")
    ids = data.episode_ids()
    starts = np.searchsorted(data.episode, ids)
    row_task = np.zeros(len(data), np.int64) if data.task is None else data.task
    episode_task = row_task[starts]
    keep = []
    for name in tasks:
        tid = next(k for k, v in table.items() if v == name)
        mine = ids[episode_task == tid]
        if demos_per_task is not None:
            if len(mine) < demos_per_task:
                raise ValueError(f"demos_per_task={demos_per_task}, but task {name!r} has only "
                                 f"{len(mine)} episodes in the dataset")
            mine = mine[:demos_per_task]
        keep.append(mine)
    return data.select_episodes(np.sort(np.concatenate(keep))), tasks


def window_indices(episode: np.ndarray, obs_horizon: int, action_horizon: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of every row's observation history ``(N, T_o)`` and action chunk ``(N,
    T_a)``, clamped to the row's episode (rows sorted by episode and time)."""
    if obs_horizon < 1 or action_horizon < 1:
        raise ValueError(f"obs_horizon and action_horizon must be >= 1, got {obs_horizon}, "
                         f"{action_horizon}")
    N = len(episode)
    rows = np.arange(N)
    first = np.flatnonzero(np.r_[True, episode[1:] != episode[:-1]])
    last = np.r_[first[1:], N] - 1
    run = np.repeat(np.arange(len(first)), np.diff(np.r_[first, N]))
    lo, hi = first[run], last[run]
    hist = np.clip(rows[:, None] + np.arange(-obs_horizon + 1, 1)[None], lo[:, None], None)
    chunk = np.minimum(rows[:, None] + np.arange(action_horizon)[None], hi[:, None])
    return hist, chunk


class DemonstrationWindows(Dataset):
    """Minibatches of windows: item ``idx`` (a list of rows) is ``{"observation": (b, T_o, o),
    "action": (b, T_a, a), "task": (b,) int64}`` as tensors (``observation`` is the
    concatenation of ``observation_keys``)."""

    def __init__(self, data: TrajectorySet, tasks: Sequence[str], obs_horizon: int = 1,
                 action_horizon: int = 1,
                 observation_keys: Sequence[str] = ("observation",)) -> None:
        for key in observation_keys:
            if getattr(data, key, None) is None:
                raise ValueError(f"observation_keys names {key!r}, which the dataset lacks")
        if "achieved_goal" in observation_keys and data.meta.get("achieved_goal_at") != \
                "observation":
            raise ValueError("observation_keys names 'achieved_goal', but the dataset's are "
                             "the ones after each action (the format's): convert it with "
                             "goal_off_policy.achieved_goal_at_observation first")
        obs = np.concatenate([getattr(data, k) for k in observation_keys], -1)
        self.observation = torch.as_tensor(obs, dtype=torch.float32)
        self.action = torch.as_tensor(data.action, dtype=torch.float32)
        self.task = torch.as_tensor(task_index(data, tasks))
        hist, chunk = window_indices(data.episode, obs_horizon, action_horizon)
        self.hist, self.chunk = torch.as_tensor(hist), torch.as_tensor(chunk)

    def __len__(self) -> int:
        return int(self.observation.shape[0])

    def __getitem__(self, idx: list[int]) -> dict[str, Tensor]:
        rows = torch.as_tensor(idx, dtype=torch.long)
        return {"observation": self.observation[self.hist[rows]],
                "action": self.action[self.chunk[rows]], "task": self.task[rows]}


class DemonstrationsDataModule(L.LightningDataModule):
    """Demonstrations from a dataset file or folder of shards, as windows for the model.

    Args:
        path: ``.npz`` file or folder of shards in the :mod:`diffto.data.trajectories` format.
        demos_per_task: the first ones (by episode id) of each task the model learns;
            ``None``: all.
        batch_size: windows per training step.

    The tasks, the observation entries and the window lengths are the model's (its
    ``tasks``, ``observation_keys``, ``obs_horizon`` and ``action_horizon``), read at setup,
    so they are set in one place. Validation is the model's closed-loop evaluation in the
    environment: the validation loader yields one empty batch.
    """

    def __init__(self, path: str, demos_per_task: int | None = None,
                 batch_size: int = 256) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.path, self.demos_per_task, self.batch_size = path, demos_per_task, batch_size
        self.train_set: TrajectorySet | None = None
        self.windows: DemonstrationWindows | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        model = self.trainer.lightning_module if self.trainer is not None else None
        tasks = getattr(model, "tasks", None)
        data = load_trajectories(self.path)
        self.train_set, tasks = select_demonstrations(data, tasks, self.demos_per_task)
        self.windows = DemonstrationWindows(
            self.train_set, tasks, getattr(model, "obs_horizon", 1),
            getattr(model, "action_horizon", 1),
            getattr(model, "observation_keys", ("observation",)))

    def train_dataloader(self) -> DataLoader:
        assert self.windows is not None
        return DataLoader(self.windows, batch_size=None, num_workers=0,
                          sampler=BatchSampler(RandomSampler(self.windows), self.batch_size,
                                               drop_last=False))

    def val_dataloader(self) -> DataLoader:
        return DataLoader([{}], batch_size=None, num_workers=0)
