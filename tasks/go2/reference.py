"""A Go2 reference motion: body and joint trajectories, contact schedule and feedforward torques.

A reference covers ``N`` phases of length ``dt`` (0.02 s, 50 Hz). States live at the knots
``0..N`` and what acts between two knots lives on the intervals ``0..N-1``:

=================  ===========  =========================================================
array              shape        meaning
=================  ===========  =========================================================
``body_pos``       ``(N+1, 3)`` base origin, world frame (MuJoCo ``qpos[0:3]``)
``body_vel``       ``(N+1, 3)`` base origin velocity, world frame (``qvel[0:3]``)
``body_euler``     ``(N+1, 3)`` roll, pitch, yaw; ``R = Rz(yaw) Ry(pitch) Rx(roll)``
``body_ang_vel``   ``(N+1, 3)`` angular velocity, base frame (``qvel[3:6]``)
``joint_pos``      ``(N+1, 12)`` joint angles, qpos order FL, FR, RL, RR × (hip, thigh, calf)
``joint_vel``      ``(N, 12)``  joint velocities over each interval
``grf``            ``(N, 12)``  ground force on each foot, world frame, FL, FR, RL, RR × xyz
``contact``        ``(N, 4)``   bool, foot in stance during the interval
``tau_ff``         ``(N, 12)``  feedforward torques ``-Jᵀ f`` in joint order
=================  ===========  =========================================================

Accessors take an integer phase and clamp it into range, so asking past the end returns the
last value. ``save``/``load`` use one ``.npz`` with exactly these arrays, ``dt`` and a JSON
``meta`` string; :meth:`ReferenceTrajectory.from_files` reads the raw ``.npy`` outputs of an
MPC instead (layout in its docstring).
"""

from __future__ import annotations

import json
import operator
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from diffto.tasks.go2.feedforward import FeedforwardComputer
from diffto.tasks.go2.legs import rpy_to_quat

__all__ = ["ReferenceTrajectory"]

_KNOT_ARRAYS = {"body_pos": 3, "body_vel": 3, "body_euler": 3, "body_ang_vel": 3, "joint_pos": 12}
_INTERVAL_ARRAYS = {"joint_vel": 12, "grf": 12, "contact": 4, "tau_ff": 12}
_STATE_COLUMNS = 30


def _check_array(name: str, value: Any, shape: tuple[int, ...], shape_text: str) -> np.ndarray:
    """Return ``value`` as float64 after checking its shape and finiteness."""
    arr = np.asarray(value)
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise ValueError(
            f"{name} must be a numeric array of shape {shape_text}, got dtype {arr.dtype}"
        )
    if arr.shape != shape:
        raise ValueError(f"{name} must have shape {shape_text} = {shape}, got {arr.shape}")
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains {int((~np.isfinite(arr)).sum())} NaN/Inf entries")
    return arr


def _check_contact(name: str, value: Any, shape: tuple[int, ...], shape_text: str) -> np.ndarray:
    """Contact flags as bool; only 0/1 (or True/False) are accepted."""
    arr = _check_array(name, value, shape, shape_text)
    if not np.all((arr == 0) | (arr == 1)):
        raise ValueError(
            f"{name} must hold only 0/1 (or booleans), got values {np.unique(arr)[:8]}"
        )
    return arr.astype(bool)


def _as_int(name: str, value: Any) -> int:
    try:
        return operator.index(value)
    except TypeError as err:
        raise ValueError(f"{name} must be an integer, got {value!r}") from err


def _check_dt(dt: Any) -> float:
    try:
        dt = float(dt)
    except (TypeError, ValueError) as err:
        raise ValueError(f"dt must be a positive number, got {dt!r}") from err
    if not (np.isfinite(dt) and dt > 0):
        raise ValueError(f"dt must be a positive finite number, got {dt}")
    return dt


def _read_npy(name: str, source: Any) -> tuple[np.ndarray, str]:
    """Load one raw array (a path to a ``.npy`` file or an array) and a label for messages."""
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        label = f"{name} ({path.name})"
        try:
            data = np.load(path, allow_pickle=False)
        except ValueError as err:  # object arrays need pickle: refuse them
            raise ValueError(f"{label}: not a plain numeric .npy array ({err})") from err
        if not isinstance(data, np.ndarray):
            raise ValueError(
                f"{label}: expected a single .npy array, got an archive of "
                f"{list(getattr(data, 'files', []))}"
            )
        return data, label
    return np.asarray(source), name


class ReferenceTrajectory:
    """Reference motion for tracking (see the module docstring for array layouts).

    Args:
        body_pos, body_vel, body_euler, body_ang_vel: ``(N+1, 3)`` base states at the knots.
        joint_pos: ``(N+1, 12)`` joint angles at the knots.
        joint_vel: ``(N, 12)``; grf: ``(N, 12)``; contact: ``(N, 4)`` bool, per interval.
        tau_ff: ``(N, 12)`` feedforward torques; ``None`` computes ``-Jᵀ f`` from the rest.
        dt: phase length in seconds.
        meta: JSON-serializable description (motion, options, solver statistics).
    """

    body_pos: np.ndarray
    body_vel: np.ndarray
    body_euler: np.ndarray
    body_ang_vel: np.ndarray
    joint_pos: np.ndarray

    def __init__(
        self,
        body_pos: np.ndarray,
        body_vel: np.ndarray,
        body_euler: np.ndarray,
        body_ang_vel: np.ndarray,
        joint_pos: np.ndarray,
        joint_vel: np.ndarray,
        grf: np.ndarray,
        contact: np.ndarray,
        tau_ff: np.ndarray | None = None,
        dt: float = 0.02,
        meta: dict[str, Any] | None = None,
    ) -> None:
        n = np.shape(joint_vel)[0] if np.ndim(joint_vel) >= 1 else 0
        if n < 1:
            raise ValueError(
                f"joint_vel must have shape (N, 12) with N >= 1, got {np.shape(joint_vel)}"
            )
        given = dict(
            body_pos=body_pos,
            body_vel=body_vel,
            body_euler=body_euler,
            body_ang_vel=body_ang_vel,
            joint_pos=joint_pos,
            joint_vel=joint_vel,
            grf=grf,
            contact=contact,
        )
        for name, cols in _KNOT_ARRAYS.items():
            setattr(self, name, _check_array(name, given[name], (n + 1, cols), f"(N+1, {cols})"))
        self.joint_vel = _check_array("joint_vel", joint_vel, (n, 12), "(N, 12)")
        self.grf = _check_array("grf", grf, (n, 12), "(N, 12)")
        self.contact = _check_contact("contact", contact, (n, 4), "(N, 4)")
        self.dt = _check_dt(dt)
        self.meta = dict(meta or {})
        try:  # fail now, not at save time, if meta cannot be stored
            json.dumps(self.meta)
        except TypeError as err:
            raise ValueError(f"meta must be JSON-serializable: {err}") from err
        self._quat = rpy_to_quat(self.body_euler)  # (N+1, 4)
        if tau_ff is None:
            tau_ff = FeedforwardComputer().precompute_trajectory(self)
        self.tau_ff = _check_array("tau_ff", tau_ff, (n, 12), "(N, 12)")

    @property
    def num_phases(self) -> int:
        """Number of intervals ``N`` (there are ``N+1`` knots)."""
        return self.joint_vel.shape[0]

    @property
    def duration(self) -> float:
        """``N · dt`` in seconds."""
        return self.num_phases * self.dt

    def _knot(self, phase: int) -> int:
        return min(max(_as_int("phase", phase), 0), self.num_phases)

    def _interval(self, phase: int) -> int:
        return min(max(_as_int("phase", phase), 0), self.num_phases - 1)

    def get_body_pos(self, phase: int) -> np.ndarray:
        """Base position ``(3,)``, world frame."""
        return self.body_pos[self._knot(phase)].copy()

    def get_body_quat(self, phase: int) -> np.ndarray:
        """Base orientation ``(4,)`` (w, x, y, z), base to world."""
        return self._quat[self._knot(phase)].copy()

    def get_body_euler(self, phase: int) -> np.ndarray:
        """Roll, pitch, yaw ``(3,)``."""
        return self.body_euler[self._knot(phase)].copy()

    def get_body_vel(self, phase: int) -> np.ndarray:
        """Base linear velocity ``(3,)``, world frame."""
        return self.body_vel[self._knot(phase)].copy()

    def get_body_ang_vel(self, phase: int) -> np.ndarray:
        """Base angular velocity ``(3,)``, base frame."""
        return self.body_ang_vel[self._knot(phase)].copy()

    def get_joint_pos(self, phase: int) -> np.ndarray:
        """Joint angles ``(12,)``, qpos order."""
        return self.joint_pos[self._knot(phase)].copy()

    def get_joint_vel(self, phase: int) -> np.ndarray:
        """Joint velocities ``(12,)`` over the interval starting at ``phase``."""
        return self.joint_vel[self._interval(phase)].copy()

    def get_feedforward_torque(self, phase: int) -> np.ndarray:
        """Feedforward torques ``(12,)``, joint order."""
        return self.tau_ff[self._interval(phase)].copy()

    def get_grf(self, phase: int) -> np.ndarray:
        """Ground forces ``(12,)`` on FL, FR, RL, RR (xyz each), world frame."""
        return self.grf[self._interval(phase)].copy()

    def get_contact_state(self, phase: int) -> np.ndarray:
        """Stance flags ``(4,)`` bool, feet FL, FR, RL, RR."""
        return self.contact[self._interval(phase)].copy()

    def get_phase_encoding(self, phase: int) -> np.ndarray:
        """``[cos, sin](2π p / N)`` ``(2,)`` with ``p`` clamped to ``0..N``."""
        angle = 2.0 * np.pi * self._knot(phase) / self.num_phases
        return np.array([np.cos(angle), np.sin(angle)])

    def is_near_contact_transition(self, phase: int, foot: int, window: int) -> bool:
        """Whether ``foot``'s contact state changes within ``window`` phases of ``phase``.

        True when the foot's flag is not constant over the intervals ``phase - window`` to
        ``phase + window`` (clamped to the reference): the grace region around touch-down
        and lift-off where a tracking reward should not insist on contact consistency.
        """
        foot = _as_int("foot", foot)
        if not 0 <= foot < 4:
            raise ValueError(f"foot must be an index in 0..3 (FL, FR, RL, RR), got {foot}")
        window = _as_int("window", window)
        if window < 0:
            raise ValueError(f"window must be >= 0, got {window}")
        p = _as_int("phase", phase)
        lo, hi = self._interval(p - window), self._interval(p + window)
        flags = self.contact[lo : hi + 1, foot]
        return bool(flags.min() != flags.max())

    def qpos(self, phase: int) -> np.ndarray:
        """MuJoCo ``qpos (19,)``: base position, base quaternion (w, x, y, z), joint angles."""
        return np.concatenate(
            [self.get_body_pos(phase), self.get_body_quat(phase), self.get_joint_pos(phase)]
        )

    def qvel(self, phase: int) -> np.ndarray:
        """MuJoCo ``qvel (18,)``: linear velocity (world), angular (base), joint velocities."""
        return np.concatenate(
            [self.get_body_vel(phase), self.get_body_ang_vel(phase), self.get_joint_vel(phase)]
        )

    def arrays(self) -> dict[str, np.ndarray]:
        """The named arrays of the ``.npz`` format (without ``dt`` and ``meta``)."""
        return {name: getattr(self, name) for name in (*_KNOT_ARRAYS, *_INTERVAL_ARRAYS)}

    def save(self, path: str | os.PathLike) -> Path:
        """Write one ``.npz`` atomically (temporary file in the same folder, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(
                    f, **self.arrays(), dt=np.float64(self.dt), meta=np.array(json.dumps(self.meta))
                )
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> ReferenceTrajectory:
        """Read a reference written by :meth:`save`; unknown or missing arrays raise."""
        path = Path(path)
        with np.load(path, allow_pickle=False) as data:
            files = set(data.files)
            required = {*_KNOT_ARRAYS, *_INTERVAL_ARRAYS, "dt"}
            allowed = required | {"meta"}
            if missing := required - files:
                raise ValueError(f"{path.name}: missing arrays {sorted(missing)}")
            if extra := files - allowed:
                raise ValueError(
                    f"{path.name}: unexpected arrays {sorted(extra)}; "
                    f"a reference holds exactly {sorted(allowed)}"
                )
            arrays = {name: data[name] for name in required - {"dt"}}
            meta = json.loads(str(data["meta"])) if "meta" in files else {}
            dt = data["dt"]
        if np.shape(dt) != ():
            raise ValueError(f"{path.name}: dt must be a scalar, got shape {np.shape(dt)}")
        try:
            return cls(**arrays, dt=float(dt), meta=meta)
        except ValueError as err:
            raise ValueError(f"{path.name}: {err}") from err

    @classmethod
    def from_files(
        cls,
        state_traj: str | os.PathLike | np.ndarray,
        grf_traj: str | os.PathLike | np.ndarray,
        joint_vel_traj: str | os.PathLike | np.ndarray,
        contact_sequence: str | os.PathLike | np.ndarray | None = None,
        dt: float = 0.02,
        *,
        contact_force_threshold: float = 1.0,
    ) -> ReferenceTrajectory:
        """Build a reference from raw MPC outputs (``.npy`` paths or arrays).

        Args:
            state_traj: ``(N+1, 30)``: body position 0:3 (world), body velocity 3:6 (world),
                roll-pitch-yaw 6:9, angular velocity 9:12 (base frame), joint angles 12:24
                (qpos order). Columns 24:30 are carried by the MPC but not read: joint
                velocities come from ``joint_vel_traj``.
            grf_traj: ``(N, 12)`` ground forces on FL, FR, RL, RR (xyz), world frame.
            joint_vel_traj: ``(N, 12)`` joint velocities per interval.
            contact_sequence: ``(4, N)`` 0/1 stance flags (feet × intervals); ``None`` derives
                them as ``f_z > contact_force_threshold`` newtons.
            dt: interval length in seconds.

        Anything else (another shape, a transposed contact sequence, NaN/Inf, non-numeric
        data, an ``.npz`` archive) raises ``ValueError`` naming the file and array.
        """
        state, state_label = _read_npy("state_traj", state_traj)
        if state.ndim != 2 or state.shape[1] != _STATE_COLUMNS or state.shape[0] < 2:
            raise ValueError(
                f"{state_label}: expected shape (N+1, {_STATE_COLUMNS}) with "
                f"N >= 1, got {state.shape}"
            )
        n = state.shape[0] - 1
        state = _check_array(state_label, state, (n + 1, _STATE_COLUMNS), "(N+1, 30)")
        grf, grf_label = _read_npy("grf_traj", grf_traj)
        grf = _check_array(grf_label, grf, (n, 12), "(N, 12) with N+1 = rows of state_traj")
        jv, jv_label = _read_npy("joint_vel_traj", joint_vel_traj)
        jv = _check_array(jv_label, jv, (n, 12), "(N, 12) with N+1 = rows of state_traj")
        if contact_sequence is None:
            contact = grf.reshape(n, 4, 3)[:, :, 2] > contact_force_threshold
        else:
            raw, c_label = _read_npy("contact_sequence", contact_sequence)
            contact = _check_contact(c_label, raw, (4, n), "(4, N) feet × intervals").T
        return cls(
            body_pos=state[:, 0:3],
            body_vel=state[:, 3:6],
            body_euler=state[:, 6:9],
            body_ang_vel=state[:, 9:12],
            joint_pos=state[:, 12:24],
            joint_vel=jv,
            grf=grf,
            contact=contact,
            dt=_check_dt(dt),
            meta={"source": "from_files"},
        )
