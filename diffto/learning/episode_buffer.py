"""A replay buffer of whole episodes that samples future states of the same episode.

Goal-conditioned off-policy learners relabel a transition ``(s_t, a_t)`` with a goal reached
later in *its own* episode: contrastive RL trains its critic to tell that goal from the goals
of other transitions, HER rewrites the reward for it. The buffer therefore keeps episodes
whole, in preallocated episode slots of ``max_episode_steps + 1`` rows (the states
``s_0 … s_L`` and the actions ``a_0 … a_{L-1}`` of an episode of ``L`` steps), filled by
``num_envs`` environments in lockstep. Slots are reused in order once the buffer is full (the
oldest episode goes first); an episode becomes sampleable when it ends, so every future
index is valid.

Sampling (:meth:`EpisodeReplayBuffer.sample`)
    A transition is drawn uniformly among all stored transitions (a slot with probability ∝
    its length ``L``, then ``t`` uniform in ``0 … L−1``) and a future row ``t + Δ`` of the same
    slot with

    - ``offset="geometric"``: ``P(Δ) ∝ γ^(Δ−1)`` on ``Δ ∈ {1, …, L − t}`` (the discounted state
      occupancy contrastive RL estimates), drawn exactly by inverting the truncated
      geometric CDF: ``Δ = 1 + ⌊log(1 − u (1 − γ^(L−t))) / log γ⌋``, ``u ~ U[0, 1)``;
    - ``offset="uniform"``: ``Δ`` uniform on ``{1, …, L − t}`` (HER's "future" strategy).

    Every sample carries its episode id (a counter over all episodes ever stored), so a
    future goal's episode can be checked, and whether it comes from a dataset
    (:meth:`EpisodeReplayBuffer.add_episode`) or from the environments.

    With ``dataset_fraction=p`` a share ``p`` of the batch is drawn from the dataset's
    episodes and the rest from the environments' (each part uniformly over its transitions,
    as above; RLPD's symmetric sampling is ``p = 0.5``), so the dataset keeps its weight in
    the batches however much online data arrives, as long as its episodes are stored (slot
    reuse takes the oldest first). Where one of the two is empty the whole batch comes from
    the other.

Memory
    ``4 · (Σ state dims + action dim) · (max_episode_steps + 1) · slots`` bytes in float32
    plus ``4 · Σ episode dims · slots``, with ``slots = capacity // max_episode_steps``: about
    ``4 · (Σ state dims + action dim)`` bytes per transition of capacity. The Metaworld setting
    (a 36-d state, a 3-d goal, a 4-d action; 200-step episodes) takes 4 · 43 B · 201/200 ≈
    174 MB per million transitions. Slots are sized for full-length episodes: shorter ones
    leave their remaining rows unused.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

__all__ = ["EpisodeReplayBuffer", "check_dataset_fraction"]


class EpisodeReplayBuffer:
    """Episodes from ``num_envs`` lockstep environments in preallocated slots.

    Args:
        capacity: transitions to keep (rounded down to whole slots of ``max_episode_steps``).
        max_episode_steps: longest episode (an episode that runs longer is an error).
        num_envs: environments writing in lockstep (each holds one open slot).
        state_dims: per-step arrays stored for every state ``s_t``, name -> size (e.g.
            ``{"observation": 36, "achieved_goal": 3}``).
        action_dim: size of the action.
        episode_dims: arrays constant over an episode, name -> size (e.g. the desired goal).
        seed: seed of the sampling generator.

    Write with :meth:`begin` (first states of new episodes) and :meth:`step` (the action and
    the state it led to; a finished episode is committed); read with :meth:`sample`.
    """

    def __init__(self, capacity: int, max_episode_steps: int, num_envs: int,
                 state_dims: dict[str, int], action_dim: int,
                 episode_dims: dict[str, int] | None = None, seed: int | None = None) -> None:
        for name, value in (("capacity", capacity), ("max_episode_steps", max_episode_steps),
                            ("num_envs", num_envs), ("action_dim", action_dim)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        slots = capacity // max_episode_steps
        if slots < num_envs + 1:
            raise ValueError(
                f"capacity (buffer_capacity) must hold at least num_envs + 1 = {num_envs + 1} "
                f"episodes of max_episode_steps = {max_episode_steps} steps, got {capacity}"
            )
        episode_dims = dict(episode_dims or {})
        for name, dim in {**state_dims, **episode_dims}.items():
            if not isinstance(dim, int) or dim < 1:
                raise ValueError(f"the size of {name!r} must be an int >= 1, got {dim!r}")
        self.num_slots, self.max_episode_steps, self.num_envs = slots, max_episode_steps, num_envs
        rows = max_episode_steps + 1
        self.states = {k: np.zeros((slots, rows, d), np.float32) for k, d in state_dims.items()}
        self.actions = np.zeros((slots, rows, action_dim), np.float32)
        self.episode = {k: np.zeros((slots, d), np.float32) for k, d in episode_dims.items()}
        self.length = np.zeros(slots, np.int64)  # steps of a committed episode, 0 if none
        self.terminated = np.zeros(slots, bool)
        self.episode_id = np.full(slots, -1, np.int64)
        self.from_dataset = np.zeros(slots, bool)
        self._open = np.full(num_envs, -1, np.int64)  # each env's open slot
        self._t = np.zeros(num_envs, np.int64)  # rows written in it so far minus one
        self._next_id = 0  # episodes begun, ever
        self._next_slot = 0  # slots are reused in this order (oldest episode first)
        self.rng = np.random.default_rng(seed)

    @property
    def nbytes(self) -> int:
        arrays = [*self.states.values(), self.actions, *self.episode.values()]
        return int(sum(a.nbytes for a in arrays))

    def __len__(self) -> int:
        """Committed (sampleable) transitions."""
        return int(self.length.sum())

    @property
    def episodes_stored(self) -> int:
        return int(np.count_nonzero(self.length))

    # ------------------------------------------------------------------ writing
    def begin(self, states: dict[str, np.ndarray], episode: dict[str, np.ndarray] | None = None,
              envs: np.ndarray | None = None) -> None:
        """Open new episodes for ``envs`` (default: all) with their first states ``(n, d)``."""
        envs = np.arange(self.num_envs) if envs is None else np.asarray(envs, np.int64)
        self._check(states, self.states, len(envs), "states")
        self._check(episode or {}, self.episode, len(envs), "episode")
        for i, env in enumerate(envs):
            slot = self._next_slot
            while slot in self._open:  # another env is still writing there: skip it
                slot = (slot + 1) % self.num_slots
            self._next_slot = (slot + 1) % self.num_slots
            self.length[slot] = 0  # the oldest episode gives its slot up
            self.terminated[slot] = False
            self.from_dataset[slot] = False
            self.episode_id[slot] = self._next_id
            self._next_id += 1
            self._open[env], self._t[env] = slot, 0
            for k, v in states.items():
                self.states[k][slot, 0] = v[i]
            for k, v in (episode or {}).items():
                self.episode[k][slot] = v[i]

    def step(self, actions: np.ndarray, next_states: dict[str, np.ndarray],
             terminated: np.ndarray, truncated: np.ndarray) -> None:
        """Append ``actions (E, a)`` and the states they led to for every env; episodes that
        ended (``terminated | truncated``, with their *final* states in ``next_states``) are
        committed and their envs need :meth:`begin` before the next step."""
        if (self._open < 0).any():
            raise RuntimeError(f"envs {np.flatnonzero(self._open < 0).tolist()} have no open "
                               f"episode: call begin() with their first states")
        self._check(next_states, self.states, self.num_envs, "next_states")
        slots, t = self._open, self._t
        if (t >= self.max_episode_steps).any():
            raise ValueError(f"an episode ran longer than max_episode_steps = "
                             f"{self.max_episode_steps}: raise it to the environment's limit")
        self.actions[slots, t] = actions
        for k, v in next_states.items():
            self.states[k][slots, t + 1] = v
        self._t += 1
        done = np.asarray(terminated, bool) | np.asarray(truncated, bool)
        for env in np.flatnonzero(done):
            slot = self._open[env]
            self.length[slot] = self._t[env]
            self.terminated[slot] = bool(terminated[env])
            self._open[env] = -1

    def add_episode(self, states: dict[str, np.ndarray], actions: np.ndarray,
                    episode: dict[str, np.ndarray] | None = None,
                    terminated: bool = False) -> None:
        """Store one finished episode of ``L`` steps from a dataset: ``states[k] (L + 1,
        d)``, ``actions (L, a)``, in the next slot, beside the envs' open episodes."""
        L = len(actions)
        if not 1 <= L <= self.max_episode_steps:
            raise ValueError(f"an episode must have 1 to max_episode_steps = "
                             f"{self.max_episode_steps} actions, got {L}")
        self._check({k: v[:1] for k, v in states.items()}, self.states, 1, "states")
        for k, v in states.items():
            if len(v) != L + 1:
                raise ValueError(f"states[{k!r}] must have L + 1 = {L + 1} rows, got {len(v)}")
        slot = self._next_slot
        if slot in self._open:
            raise RuntimeError("the buffer is too small: a dataset episode would overwrite an "
                               "environment's open episode; raise capacity")
        self._next_slot = (slot + 1) % self.num_slots
        for k, v in states.items():
            self.states[k][slot, :L + 1] = v
        self.actions[slot, :L] = actions
        for k, v in (episode or {}).items():
            self.episode[k][slot] = v
        self.length[slot], self.terminated[slot] = L, bool(terminated)
        self.from_dataset[slot] = True
        self.episode_id[slot] = self._next_id
        self._next_id += 1

    def _check(self, given: dict[str, np.ndarray], stored: dict[str, np.ndarray], n: int,
               what: str) -> None:
        if set(given) != set(stored):
            raise ValueError(f"{what} must have the entries {sorted(stored)}, got {sorted(given)}")
        for k, v in given.items():
            if np.shape(v) != (n, stored[k].shape[-1]):
                raise ValueError(f"{what}[{k!r}] must have shape {(n, stored[k].shape[-1])}, "
                                 f"got {np.shape(v)}")

    # ------------------------------------------------------------------ reading
    def _slots(self, valid: np.ndarray, n: int) -> np.ndarray:
        """``n`` slots among ``valid``, each with probability ∝ its length."""
        lengths = self.length[valid]
        return valid[self.rng.choice(valid.size, size=n, p=lengths / lengths.sum())]

    def sample(self, batch_size: int, gamma: float = 0.99,
               offset: Literal["geometric", "uniform"] = "geometric",
               dataset_fraction: float | None = None) -> dict[str, np.ndarray]:
        """``batch_size`` transitions with a future row of the same episode each, a share
        ``dataset_fraction`` of them from the dataset's episodes (``None``: uniform over all;
        module docstring).

        Returns, per entry ``k`` of ``state_dims``: ``k`` (at ``t``), ``next_k`` (``t + 1``)
        and ``future_k`` (``t + Δ``); ``action``; each ``episode_dims`` entry; ``terminal``
        (the episode terminated at ``t + 1``); ``episode_id``, ``from_dataset``, ``timestep``
        and ``offset``.
        """
        valid = np.flatnonzero(self.length)
        if valid.size == 0:
            raise RuntimeError("the buffer holds no finished episode yet")
        if offset not in ("geometric", "uniform"):
            raise ValueError(f"offset must be 'geometric' or 'uniform', got {offset!r}")
        if not 0.0 < gamma < 1.0:
            raise ValueError(f"gamma must be in (0, 1), got {gamma}")
        check_dataset_fraction(dataset_fraction)
        rng = self.rng
        dataset, online = valid[self.from_dataset[valid]], valid[~self.from_dataset[valid]]
        if dataset_fraction is None or dataset.size == 0 or online.size == 0:
            slot = self._slots(valid, batch_size)
        else:
            n = int(round(dataset_fraction * batch_size))
            slot = np.concatenate([self._slots(dataset, n),
                                   self._slots(online, batch_size - n)])
        L = self.length[slot]
        t = np.minimum((rng.random(batch_size) * L).astype(np.int64), L - 1)
        n = L - t  # largest offset
        u = rng.random(batch_size)
        if offset == "geometric":
            delta = 1 + np.floor(np.log1p(-u * (1.0 - gamma ** n)) / np.log(gamma))
        else:
            delta = 1 + np.floor(u * n)
        delta = np.clip(delta.astype(np.int64), 1, n)
        out: dict[str, Any] = {}
        for k, v in self.states.items():
            out[k], out[f"next_{k}"], out[f"future_{k}"] = v[slot, t], v[slot, t + 1], \
                v[slot, t + delta]
        out["action"] = self.actions[slot, t]
        for k, v in self.episode.items():
            out[k] = v[slot]
        out["terminal"] = self.terminated[slot] & (t + 1 == L)
        out["episode_id"], out["timestep"], out["offset"] = self.episode_id[slot], t, delta
        out["from_dataset"] = self.from_dataset[slot]
        return out

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The committed episodes (open ones are dropped: their envs restart anyway), as
        tensors, so that checkpoints load with ``torch.load(weights_only=True)``."""
        import torch

        keep = np.flatnonzero(self.length)
        t = torch.from_numpy
        return {
            "states": {k: t(v[keep]) for k, v in self.states.items()},
            "actions": t(self.actions[keep]),
            "episode": {k: t(v[keep]) for k, v in self.episode.items()},
            "length": t(self.length[keep]), "terminated": t(self.terminated[keep]),
            "episode_id": t(self.episode_id[keep]),
            "from_dataset": t(self.from_dataset[keep]), "next_id": self._next_id,
            "rng": self.rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (into a buffer of at least as many slots); every env
        must then :meth:`begin` a new episode."""
        state = _as_numpy(state)
        n = len(state["length"])
        if n > self.num_slots:
            raise ValueError(f"the saved buffer holds {n} episodes, more than this buffer's "
                             f"{self.num_slots} slots: raise capacity")
        order = np.argsort(state["episode_id"])  # oldest first, so reuse continues in order
        for k, v in self.states.items():
            v[:n] = state["states"][k][order]
        self.actions[:n] = state["actions"][order]
        for k, v in self.episode.items():
            v[:n] = state["episode"][k][order]
        self.length[:] = 0
        self.length[:n] = state["length"][order]
        self.terminated[:n] = state["terminated"][order]
        self.episode_id[:n] = state["episode_id"][order]
        self.episode_id[n:] = -1
        self.from_dataset[:] = False  # (buffers saved before the flag existed: all online)
        if "from_dataset" in state:
            self.from_dataset[:n] = state["from_dataset"][order]
        self._next_slot = n % self.num_slots  # after the newest restored episode
        self._next_id = int(state["next_id"])
        self._open[:] = -1
        self.rng.bit_generator.state = state["rng"]


def check_dataset_fraction(value: Any) -> None:
    """Raise unless ``value`` is ``None`` or a number in ``[0, 1]`` (not a bool)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                              or not 0.0 <= value <= 1.0):
        raise ValueError(f"dataset_fraction must be a number in [0, 1] or None, got {value!r}")


def _as_numpy(state: Any) -> Any:
    """Tensors (and nested dicts of them) back to numpy arrays."""
    if isinstance(state, dict):
        return {k: _as_numpy(v) for k, v in state.items()}
    return state.numpy() if hasattr(state, "numpy") and not isinstance(state, np.ndarray) \
        else state
