"""Metaworld's scripted expert of a task, batched: ``ScriptedExpert(task).act(obs (B, 39))``.

Metaworld ships one hand-written policy per v3 task (``metaworld.policies.ENV_POLICY_MAP``);
each maps one 39-dimensional observation (goal at ``[36:39]``) to a 4-dimensional action and
keeps no state between calls, so a batch is the policy applied row by row. The experts solve
their task from most variants but often drift away after the first success: cut
demonstrations near it.
"""

from __future__ import annotations

import numpy as np

__all__ = ["ScriptedExpert"]


class ScriptedExpert:
    """Metaworld's scripted policy of ``task`` (a name in ``METAWORLD_TASKS``).

    ``act(observation (B, 39) or (39,)) -> (B, 4) or (4,)`` float32 actions in ``[-1, 1]``.
    """

    def __init__(self, task: str) -> None:
        from metaworld.policies import ENV_POLICY_MAP

        if task not in ENV_POLICY_MAP:
            raise ValueError(f"task must name a Metaworld v3 task with a scripted policy, one "
                             f"of {sorted(ENV_POLICY_MAP)}, got {task!r}")
        self.task = task
        self._policy = ENV_POLICY_MAP[task]()

    def act(self, observation: np.ndarray) -> np.ndarray:
        """Actions ``(B, 4)`` float32 (``(4,)`` for one observation ``(39,)``)."""
        obs = np.asarray(observation, dtype=np.float64)
        if obs.shape[-1:] != (39,) or obs.ndim not in (1, 2):
            raise ValueError(f"observation must have shape (B, 39) or (39,), got {obs.shape}")
        rows = obs.reshape(-1, 39)
        actions = np.stack([self._policy.get_action(row) for row in rows]).astype(np.float32)
        actions = np.clip(actions, -1.0, 1.0)
        return actions[0] if obs.ndim == 1 else actions
