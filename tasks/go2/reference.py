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
``meta`` string.

A user's own motion, as the raw outputs of an MPC or trajectory optimizer, is read by
:meth:`ReferenceTrajectory.from_files` (arrays or ``.npy`` paths) and
:meth:`ReferenceTrajectory.from_path` (a folder of those files, or one ``.npz`` holding them
under their names):

======================  ===============  ====================================================
raw array               shape            meaning
======================  ===============  ====================================================
``state_traj``          ``(N+1, 30)``    body position 0:3 (world), body velocity 3:6
                        or ``(N+1, 36)`` (world), roll-pitch-yaw 6:9, angular velocity 9:12
                                         (base frame), joint angles 12:24 (qpos order); in
                                         30 columns 24:30 are carried but unused, in 36
                                         columns 24:36 are joint velocities at the knots
``grf_traj``            ``(N, 12)``      ground force on FL, FR, RL, RR (xyz, world, newtons)
``joint_vel_traj``      ``(N, 12)``      joint velocities per interval: the ones used
``contact_sequence``    ``(4, N)``       optional 0/1 stance flags; default ``f_z > 1 N``
======================  ===============  ====================================================

The raw files are checked for the mistake that shapes cannot catch, ``grf_traj`` and
``joint_vel_traj`` given the wrong way round (both are ``(N, 12)``): over the clip the feet's
total vertical force must carry the Go2's weight on average (:data:`WEIGHT_RATIO_BOUNDS`).
:func:`diffto.tasks.go2.reference_source.load_reference` is the one entry point that also
accepts motion names (planned) and is what the env's ``reference`` argument goes through.
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
from diffto.tasks.go2.legs import PARAMS_PATH, rpy_to_quat

__all__ = ["RAW_ARRAYS", "STATE_COLUMNS", "WEIGHT_RATIO_BOUNDS", "ReferenceTrajectory"]

_KNOT_ARRAYS = {"body_pos": 3, "body_vel": 3, "body_euler": 3, "body_ang_vel": 3, "joint_pos": 12}
_INTERVAL_ARRAYS = {"joint_vel": 12, "grf": 12, "contact": 4, "tau_ff": 12}

RAW_ARRAYS = ("state_traj", "grf_traj", "joint_vel_traj", "contact_sequence")
"""Names of the raw arrays (``<name>.npy`` in a folder, or keys of one ``.npz``); the last is
optional."""
STATE_COLUMNS = (30, 36)
"""Accepted column counts of ``state_traj``: 24:30 unused, or 24:36 knot joint velocities."""
WEIGHT_RATIO_BOUNDS = (0.3, 3.0)
"""Accepted range of the clip's mean total vertical ground force, in units of the Go2's weight
``m g`` (15.206 kg × 9.81 m/s² = 149.2 N). Momentum balance over a clip of length ``T`` gives
``mean Σ f_z = m g + m (v_z(T) - v_z(0)) / T``, so any periodic motion averages ``m g``
whatever its flight phases: the planner's 2 s trot, bound and pronk (40% in flight) measure
1.00, 0.99 and 0.96. The band is wide so that clips cut mid-jump still pass, yet joint
velocities read as forces (a few rad/s, averaging near 0) or forces in units of ``m g`` or
of the wrong sign cannot."""
_GRAVITY = 9.81  # m/s², as the planner's dynamics and the MuJoCo model
# The Go2's total mass (kg), from the same Menagerie numbers as the model and the planner.
_TOTAL_MASS = float(json.loads(PARAMS_PATH.read_text())["derived"]["total_mass"])


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


def _weight_ratio(forces: np.ndarray) -> float:
    """Mean over the clip of the feet's total vertical force ``(N, 12)`` -> units of ``m g``."""
    return float(forces.reshape(-1, 4, 3)[:, :, 2].sum(axis=1).mean()) / (_TOTAL_MASS * _GRAVITY)


def _check_weight(grf: np.ndarray, grf_label: str, jv: np.ndarray, jv_label: str) -> None:
    """Raise unless ``grf`` carries the Go2's weight on average (:data:`WEIGHT_RATIO_BOUNDS`).

    Both arrays are ``(N, 12)``, so a swap passes every shape check; read as forces, joint
    velocities average near zero, far below the band.
    """
    lo, hi = WEIGHT_RATIO_BOUNDS
    weight = _TOTAL_MASS * _GRAVITY
    ratio = _weight_ratio(grf)
    if lo <= ratio <= hi:
        return
    measured = (
        f"the mean total vertical force of {grf_label} over the clip is {ratio * weight:.1f} N "
        f"= {ratio:.2f} m·g, outside [{lo}, {hi}] m·g (the Go2's weight m·g is {weight:.1f} N)"
    )
    if lo <= (swapped := _weight_ratio(jv)) <= hi:
        raise ValueError(
            f"{grf_label} and {jv_label} look swapped: {measured}, while {jv_label} read as "
            f"forces would carry {swapped:.2f} m·g. Give the ground forces as grf_traj and "
            "the joint velocities as joint_vel_traj"
        )
    raise ValueError(
        f"{grf_label} does not carry the robot's weight: {measured}. Expected the force the "
        "ground exerts on each foot in newtons, world frame, z up, FL, FR, RL, RR × xyz "
        "(ReferenceTrajectory.from_files(..., check_weight=False) skips this check for a "
        "clip that is mostly in flight; save the result as .npz to train on it)"
    )


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
        check_weight: bool = True,
    ) -> ReferenceTrajectory:
        """Build a reference from raw MPC outputs (``.npy`` paths or arrays).

        Args:
            state_traj: ``(N+1, 30)`` or ``(N+1, 36)``: body position 0:3 (world), body
                velocity 3:6 (world), roll-pitch-yaw 6:9, angular velocity 9:12 (base frame),
                joint angles 12:24 (qpos order). With 30 columns, 24:30 are carried by the
                MPC but not read. With 36, 24:36 are the joint velocities at the knots; they
                are not read either: the reference's joint velocities (the env's initial
                ``qvel``, its velocity feedforward) are ``joint_vel_traj``'s, one per
                interval, and the knot values are not compared with them (an MPC's knot and
                interval velocities may differ; neither layout is an error for it).
            grf_traj: ``(N, 12)`` force the ground exerts on FL, FR, RL, RR (xyz), world
                frame, newtons (z up: stance feet push the robot up).
            joint_vel_traj: ``(N, 12)`` joint velocities (rad/s) per interval.
            contact_sequence: ``(4, N)`` 0/1 stance flags (feet × intervals); ``None`` derives
                them as ``f_z > contact_force_threshold`` newtons.
            dt: interval length in seconds.
            check_weight: check that ``grf_traj`` carries the robot's weight on average
                (:data:`WEIGHT_RATIO_BOUNDS`); switch off only for a clip that is mostly in
                flight.

        Raises:
            ValueError: naming the file and array, for anything else: another shape (a
                ``state_traj`` with neither 30 nor 36 columns, a transposed contact
                sequence), NaN/Inf, non-numeric data, an ``.npz`` archive; and for a
                ``grf_traj`` whose mean total vertical force lies outside
                :data:`WEIGHT_RATIO_BOUNDS` × ``m g``, saying the two ``(N, 12)`` files look
                swapped when ``joint_vel_traj`` would carry the weight instead.
        """
        raw = {
            "state_traj": _read_npy("state_traj", state_traj),
            "grf_traj": _read_npy("grf_traj", grf_traj),
            "joint_vel_traj": _read_npy("joint_vel_traj", joint_vel_traj),
        }
        if contact_sequence is not None:
            raw["contact_sequence"] = _read_npy("contact_sequence", contact_sequence)
        return cls._from_raw(
            raw, dt, contact_force_threshold, check_weight, meta={"source": "from_files"}
        )

    @classmethod
    def from_path(
        cls,
        path: str | os.PathLike,
        *,
        dt: float = 0.02,
        contact_force_threshold: float = 1.0,
        check_weight: bool = True,
    ) -> ReferenceTrajectory:
        """Read a reference from disk in any of its file forms.

        Args:
            path: a ``.npz`` written by :meth:`save` (read by :meth:`load`, its own ``dt``
                applies); a ``.npz`` holding the raw arrays under the names
                :data:`RAW_ARRAYS`; or a folder holding ``state_traj.npy``, ``grf_traj.npy``,
                ``joint_vel_traj.npy`` and optionally ``contact_sequence.npy`` (other files in
                it are ignored).
            dt, contact_force_threshold, check_weight: as in :meth:`from_files`, for raw
                arrays.

        Raises:
            ValueError: the path does not exist or is another kind of file, a folder or
                archive lacks a required array or holds unknown ones, or :meth:`from_files`
                rejects the arrays; the message starts with the path.
        """
        path = Path(path).expanduser()
        accepted = (
            "a reference .npz (ReferenceTrajectory.save, or the raw arrays state_traj, grf_traj, "
            "joint_vel_traj and optionally contact_sequence under those names) or a folder "
            "holding state_traj.npy, grf_traj.npy, joint_vel_traj.npy and optionally "
            "contact_sequence.npy"
        )
        if path.is_dir():
            files = {name: path / f"{name}.npy" for name in RAW_ARRAYS}
            if missing := [f.name for f in list(files.values())[:3] if not f.is_file()]:
                present = sorted(p.name for p in path.iterdir() if p.suffix == ".npy")
                raise ValueError(
                    f"{path}: missing {missing} (the folder's .npy files: {present}); "
                    f"expected {accepted}"
                )
            raw = {name: _read_npy(name, f) for name, f in files.items() if f.is_file()}
        elif path.is_file() and path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                names = set(data.files)
                if not names & set(RAW_ARRAYS):  # the save format: load checks it
                    raw = None
                elif missing := set(RAW_ARRAYS[:3]) - names:
                    raise ValueError(f"{path}: missing raw arrays {sorted(missing)}")
                elif extra := names - set(RAW_ARRAYS):
                    raise ValueError(
                        f"{path}: unexpected arrays {sorted(extra)} beside the raw ones; "
                        f"expected {accepted}"
                    )
                else:
                    try:
                        raw = {n: (data[n], f"{n} ({path.name})") for n in sorted(names)}
                    except ValueError as err:  # object arrays need pickle: refuse them
                        raise ValueError(f"{path}: not plain numeric arrays ({err})") from err
            if raw is None:
                return cls.load(path)
        elif path.exists():
            raise ValueError(f"{path}: expected {accepted}")
        else:
            raise ValueError(f"{path}: no such file or folder; expected {accepted}")
        try:
            return cls._from_raw(
                raw, dt, contact_force_threshold, check_weight, meta={"source": str(path)}
            )
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from err

    @classmethod
    def _from_raw(
        cls,
        raw: dict[str, tuple[np.ndarray, str]],
        dt: float,
        contact_force_threshold: float,
        check_weight: bool,
        meta: dict[str, Any],
    ) -> ReferenceTrajectory:
        """The reference from raw arrays ``{name: (array, label for messages)}``."""
        state, state_label = raw["state_traj"]
        if state.ndim != 2 or state.shape[1] not in STATE_COLUMNS or state.shape[0] < 2:
            raise ValueError(
                f"{state_label}: expected shape (N+1, 30) or (N+1, 36) with N >= 1, got "
                f"{state.shape}; columns: body position 0:3, velocity 3:6, roll-pitch-yaw 6:9, "
                "angular velocity 9:12, joint angles 12:24, then 24:30 unused or 24:36 joint "
                "velocities at the knots"
            )
        n, cols = state.shape[0] - 1, state.shape[1]
        state = _check_array(state_label, state, (n + 1, cols), f"(N+1, {cols})")
        grf, grf_label = raw["grf_traj"]
        grf = _check_array(grf_label, grf, (n, 12), "(N, 12) with N+1 = rows of state_traj")
        jv, jv_label = raw["joint_vel_traj"]
        jv = _check_array(jv_label, jv, (n, 12), "(N, 12) with N+1 = rows of state_traj")
        if check_weight:
            _check_weight(grf, grf_label, jv, jv_label)
        if "contact_sequence" not in raw:
            contact = grf.reshape(n, 4, 3)[:, :, 2] > contact_force_threshold
        else:
            c_raw, c_label = raw["contact_sequence"]
            contact = _check_contact(c_label, c_raw, (4, n), "(4, N) feet × intervals").T
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
            meta={**meta, "state_columns": cols},
        )
