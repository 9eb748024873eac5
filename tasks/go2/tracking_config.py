"""Every constant of the Go2 OPT-Mimic tracking environment, with where it comes from.

OPT-Mimic (Fuchioka et al., 2023) tracks trajectory-optimized references with a residual PPO
policy on a 1.7 kg Solo 8 (8 joints, 2.7 Nm actuators). The Go2 weighs 15.2 kg, has 12 joints
and 23.7 / 45.43 Nm actuators, so some constants of that spec cannot be used as written. Each
field below says whether it is OPT-Mimic's value or an adaptation, and why.

Units: metres, radians, newton-metres, seconds. A config is immutable; make variants with
``dataclasses.replace(config, field=value)`` or pass ``**overrides`` to ``Go2TrackingEnv``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

__all__ = [
    "TrackingConfig", "SOLO8_TORQUE_LIMIT", "GO2_HIP_TORQUE_LIMIT", "restitution_to_damping_ratio",
]

#: Solo 8 actuation limit in OPT-Mimic's simulation (Nm).
SOLO8_TORQUE_LIMIT = 2.7
#: Go2 hip and thigh actuator limit (Nm); knees have 45.43.
GO2_HIP_TORQUE_LIMIT = 23.7
# Ratio of the per-joint error norm over 12 joints to the one over 8 joints at equal per-joint
# error: sqrt(12 / 8).
_JOINT_COUNT_RATIO = math.sqrt(12.0 / 8.0)


@dataclass(frozen=True)
class TrackingConfig:
    """Constants of :class:`~diffto.tasks.go2.env.Go2TrackingEnv`.

    Reward: ``r = Σ_k w_k exp(-e_k² / (2 σ_k²))`` over the five terms position, orientation,
    joint, action rate and max torque; the weights sum to one, so ``r ∈ [0, 1]``. An episode
    terminates when any ``e_k > termination_sigmas · σ_k``.
    """

    # --- timing (OPT-Mimic's values) ---------------------------------------------------------
    control_dt: float = 0.02
    """Policy period (s): 50 Hz, the rate of the reference knots."""
    physics_dt: float = 0.001
    """MuJoCo timestep (s): 1 kHz, so 20 physics substeps per control step."""

    # --- actuation ---------------------------------------------------------------------------
    kp: float = 100.0
    """Joint stiffness (Nm/rad). Adapted: OPT-Mimic's Solo used 3 (26 if scaled by the torque
    limits), which cannot hold the Go2 up: a PD hold of ``home`` without feedforward sags to
    0.19 m at Kp 20, 0.25 m at Kp 60 and settles at 0.26 m at Kp 100 (1 kHz, 2 s). With zero
    residual on the planned references (measured, 4 s clips, 5 start phases): trot 0.5 m/s
    survives 31 steps at Kp 40, 38 at Kp 60, 100-133 at Kp 100 (Kd 2), all 200 at Kp 120;
    trot-in-place runs every clip to its end from Kp 40, mean reward 0.84-0.97 at Kp 60,
    0.96-0.98 at Kp 100. Kp 100 makes the references nearly trackable without the policy while
    leaving it real work (the 0.5 m/s trot); stiffer gains would hide model errors behind
    torque that a real actuator's bandwidth would not deliver."""
    kd: float = 2.0
    """Joint damping gain (Nm s/rad). Adapted from Solo's 0.3 (Kd 1.5-3 measured about equal in
    tracking). With the model's passive joint damping of 2 Nm s/rad, the knee (inertia ~0.012
    kg m² incl. armature; critical damping 2 sqrt(Kp I) ≈ 2.2) is over-damped (ζ ≈ 1.8)."""
    action_limit: float = 0.5
    """Residual joint-target range (rad): an action in [-1, 1] is scaled by this. Added:
    OPT-Mimic leaves its residual unbounded (fixed exploration std 0.08 rad). 0.5 rad per joint
    leaves room for real corrections, while the step-to-step change is held by the action-rate
    term: a Gaussian policy with std 0.08 (action units, 0.04 rad) changes the residual by
    ‖Δ‖ ≈ 0.2 rad per step, far inside the termination at 2.5 σ = 1.07 rad. (Uniformly random
    actions, ‖Δ‖ ≈ 1.4 rad rms, end episodes within a few steps.)"""
    use_velocity_feedforward: bool = True
    """Add ``Kd · ref_dq`` to the PD law (the spec's ``Kd (ref_dq - dq)``). OPT-Mimic's default
    keeps only position + torque feedforward; set False for that."""

    # --- reward (weights are OPT-Mimic's) ------------------------------------------------------
    w_position: float = 0.3
    w_orientation: float = 0.3
    w_joint: float = 0.2
    w_action_rate: float = 0.1
    w_torque: float = 0.1
    sigma_position: float = 0.05
    """Body position σ (m), OPT-Mimic's value. Kept: the tolerance is an absolute drift (2.5 σ =
    12.5 cm, about half the Go2's standing height); the soft-foot sink of ~1.7 cm below a
    rigid-foot reference would cost about 6% of this term."""
    sigma_orientation: float = 0.14
    """Orientation σ on ``‖vec(q_ref⁻¹ ⊗ q)‖ = sin(θ/2)``, OPT-Mimic's value and metric:
    σ ≈ 16° of rotation, termination at 2.5 σ ≈ 41°. At PD + feedforward's 0.7° on the trot
    this term is within 0.1% of its maximum; the shipped trot and pronk configs use 0.035
    (termination at 10°)."""
    sigma_joint: float = 0.3 * _JOINT_COUNT_RATIO
    """Joint-position σ (rad) on the norm over 12 joints. Adapted: OPT-Mimic's 0.3 was for a norm
    over 8 joints; the same per-joint error gives a norm sqrt(12/8) ≈ 1.22× larger, so 0.367.
    At PD + feedforward's 0.024 rad per joint on the trot this term is within 3% of its
    maximum; the shipped trot and pronk configs use 0.1 (README, "From robust to precise")."""
    sigma_action_rate: float = 0.35 * _JOINT_COUNT_RATIO
    """σ (rad) on ‖Δ residual‖ between consecutive control steps over 12 joints: 0.35 × 1.22."""
    sigma_torque: float = 3.0 * GO2_HIP_TORQUE_LIMIT / SOLO8_TORQUE_LIMIT
    """Max-joint-torque σ (Nm). Adapted: Solo's 3 Nm with 2.5 σ termination (7.5 Nm) would end
    every Go2 episode at once (standing needs up to 8.4 Nm per knee); scaled by the torque-limit
    ratio 23.7 / 2.7 ≈ 8.8 to 26.3 Nm. Consequence: 2.5 σ = 66 Nm exceeds every Go2 actuator
    limit, so with clipped torques this term shapes the reward but never terminates."""

    # --- termination -----------------------------------------------------------------------
    termination_sigmas: float = 2.5
    """Terminate when any tracking error exceeds this many σ (OPT-Mimic)."""
    min_body_height: float = 0.05
    """Terminate when the base origin falls below this height (m)."""
    contact_grace_steps: int = 3
    """Half-width (control steps) of the window around a reference contact transition in which a
    foot may be in either contact state (OPT-Mimic). The clip's first and last ``w`` intervals
    count as such windows too: a reference cannot show a transition at its own ends."""
    terminate_on_contact_mismatch: bool = True
    """Terminate when a foot's contact disagrees with the reference outside the grace window."""

    # --- observation and episodes (added: what makes a residual stop drifting) ------------
    observe_base_velocity: bool = True
    """Append the base's linear velocity (3, base frame) and angular velocity (3, base frame)
    to the observation (OPT-Mimic's is 30-D). Added: without them the base's
    drift is invisible to the policy and the critic (the observation holds no base position
    or velocity), so a residual can only replay a correction as a function of phase, which
    fails as soon as friction or torque scale change how fast the robot walks. A real Go2 has
    both: the angular velocity is its IMU's gyroscope, the linear velocity comes from the state
    estimator that fuses IMU and leg kinematics (Unitree's SDK publishes it). False for both
    this and ``observe_position_error`` restores OPT-Mimic's proprioceptive observation."""
    observe_position_error: bool = True
    """Append the reference base position at the current phase minus the base position, in the
    base frame (3). Added: the position term carries the largest reward weight and ends the
    episode at 2.5 σ, and under randomization that is what ends PD + feedforward episodes
    (a weaker torque scale or a softer floor makes the robot lag the reference until the
    error passes 12.5 cm); velocity alone lets a policy stop the drift but not undo it. A
    real Go2's state estimator integrates its velocity into a base position (leg odometry),
    which drifts by centimetres over a clip of seconds, the scale of this error; the
    reference position is the plan's."""
    observe_joint_error: bool = False
    """Append the joint targets of the coming interval, the reference joint angles at the next
    knot, minus the joint reading ``q - o`` with its encoder offset (12, joint order). Added:
    with the phase alone the policy must memorise the reference's joint angles over the clip
    to correct errors of 0.02 rad. A real Go2 has both: its joint encoders and the plan it
    tracks."""
    clip_start_share: float = 0.0
    """Fraction of training resets (those without ``options["phase"]``) that start at phase 0;
    the rest start at a uniform random phase. OPT-Mimic's value is 0 (uniform): an episode
    then lasts half the clip on average, so a position drift that grows over the whole clip
    is rarely paid for in training. Evaluation plays the clip from phase 0."""
    terminal_at_clip_end: bool = False
    """Report the end of the clip as ``terminated`` (the task is over: nothing follows the
    reference) instead of ``truncated`` (a time limit, after which a learner bootstraps the
    value of the last state). The phase encoding of the clip's end equals that of its start,
    so a bootstrapped value there is the value of a fresh clip: a reward the task never pays.
    ``info["clip_completed"]`` tells a completed clip from a failure either way."""
    # --- domain randomization (OPT-Mimic's distributions) -----------------------------------
    friction_mean: float = 0.8
    friction_std: float = 0.25
    friction_range: tuple[float, float] = (0.1, 1.0)
    restitution_mean: float = 0.0
    restitution_std: float = 0.25
    restitution_range: tuple[float, float] = (0.0, 1.0)
    joint_offset_std: float = 0.02
    """Std (rad) of the per-joint encoder offset, drawn per episode."""
    torque_scale_mean: float = 1.0
    torque_scale_std: float = 0.1
    torque_scale_range: tuple[float, float] = (0.5, 1.5)
    """Added clip (5 σ, practically never active): the scale must stay positive, since it is
    folded into the actuator gains and force range."""
    contact_timeconst: float = 0.02
    """Contact spring time constant (s) that fixes the contact stiffness when restitution is
    mapped to contact damping: MuJoCo's default solref time constant, so restitution 0 gives
    exactly the model's default contact (solref 0.02, 1)."""

    # --- reference -------------------------------------------------------------------------
    reference_duration: float = 4.0
    """Duration (s) of a reference planned from a motion name (``plan_reference``)."""
    reference_cache_dir: str | None = None
    """Cache folder for planned references; None uses the planner's default."""
    planner_options: dict[str, Any] | None = None
    """Options of a reference planned from a motion name, over the motion's own defaults:
    fields of :class:`~diffto.tasks.go2.planner.PlannerOptions` (e.g. ``{"speed": 1.0}`` for a
    faster trot). Ignored for a reference given as data."""
    body_height_offset: float = 0.0
    """Added to the reference body height (m), for initialization and the position error. The
    Go2's soft feet sink ~1.7 cm below a rigid-foot reference; set -0.017 to compensate a
    reference that does not already account for it."""

    # --- rendering -------------------------------------------------------------------------
    render_width: int = 320
    render_height: int = 240
    render_camera: str = "track"
    render_ghost_alpha: float = 0.3
    """Opacity of the reference ghost in rendered frames: the reference pose of the current
    phase (with ``body_height_offset``, as the tracking errors use it) drawn as a light-blue
    translucent copy of the robot, so the offset between the two is the tracking error. 0
    draws no ghost. 0.3 keeps the robot, drawn opaque, clearly in front (MuJoCo blends each
    translucent surface twice, so the ghost covers about half of what lies behind it)."""

    @property
    def substeps(self) -> int:
        """Physics steps per control step (20 at the defaults)."""
        return int(round(self.control_dt / self.physics_dt))

    def __post_init__(self) -> None:
        positive = (
            "control_dt", "physics_dt", "kp", "action_limit", "sigma_position",
            "sigma_orientation", "sigma_joint", "sigma_action_rate", "sigma_torque",
            "termination_sigmas", "contact_timeconst", "reference_duration",
        )
        for name in positive:
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"TrackingConfig.{name} must be finite and > 0, got {value!r}")
        nonneg = (
            "kd", "w_position", "w_orientation", "w_joint", "w_action_rate", "w_torque",
            "friction_std", "restitution_std", "joint_offset_std", "torque_scale_std",
        )
        for name in nonneg:
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"TrackingConfig.{name} must be finite and >= 0, got {value!r}")
        ratio = self.control_dt / self.physics_dt
        if abs(ratio - round(ratio)) > 1e-9 or round(ratio) < 1:
            raise ValueError(
                f"TrackingConfig.control_dt ({self.control_dt}) must be a positive integer "
                f"multiple of physics_dt ({self.physics_dt})"
            )
        weights = (
            self.w_position + self.w_orientation + self.w_joint + self.w_action_rate
            + self.w_torque
        )
        if abs(weights - 1.0) > 1e-9:
            raise ValueError(f"TrackingConfig reward weights w_* must sum to 1, got {weights!r}")
        if self.planner_options is not None and not isinstance(self.planner_options, dict):
            raise ValueError(
                "TrackingConfig.planner_options must be a dict of PlannerOptions fields or None, "
                f"got {type(self.planner_options).__name__}"
            )
        if self.contact_grace_steps < 0:
            raise ValueError(
                f"TrackingConfig.contact_grace_steps must be >= 0, got {self.contact_grace_steps}"
            )
        if not (math.isfinite(self.clip_start_share) and 0.0 <= self.clip_start_share <= 1.0):
            raise ValueError("TrackingConfig.clip_start_share must lie in [0, 1], got "
                             f"{self.clip_start_share!r}")
        for name in ("friction_range", "restitution_range", "torque_scale_range"):
            lo, hi = getattr(self, name)
            if not lo <= hi:
                raise ValueError(f"TrackingConfig.{name} must be (low, high) with low <= high, "
                                 f"got {(lo, hi)!r}")
        if self.friction_range[0] <= 0 or self.torque_scale_range[0] <= 0:
            raise ValueError("TrackingConfig.friction_range and torque_scale_range must be > 0")
        if not (0 <= self.restitution_range[0] and self.restitution_range[1] <= 1):
            raise ValueError(
                f"TrackingConfig.restitution_range must lie in [0, 1], got {self.restitution_range}"
            )
        if self.render_width < 1 or self.render_height < 1:
            raise ValueError("TrackingConfig.render_width and render_height must be >= 1")

    def replace(self, **overrides: object) -> TrackingConfig:
        """A copy with ``overrides`` applied; an unknown name raises ``ValueError``."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ValueError(
                f"unknown TrackingConfig field(s) {unknown}; expected some of {sorted(names)}"
            )
        return dataclasses.replace(self, **overrides)


def restitution_to_damping_ratio(restitution: float) -> float:
    """Contact damping ratio ``ζ`` whose bounce has coefficient of restitution ``restitution``.

    MuJoCo has no restitution coefficient; its soft contact is a spring-damper on the
    penetration ``r``, ``r̈ + 2ζω ṙ + ω² r = 0``, acting only while ``r < 0``. An underdamped
    contact (ζ < 1) leaves after half a period with speed ratio ``e = exp(-ζπ / sqrt(1 - ζ²))``;
    inverted, ``ζ = -ln e / sqrt(π² + ln² e)``: ``e = 0`` → 1 (critically damped, no bounce),
    ``e = 1`` → 0 (undamped). The env keeps MuJoCo's default stiffness (time constant ``c``) and
    sets ``solref = (-1/c², -2ζ/c)``, MuJoCo's direct (stiffness, damping) form; at ζ = 1 that is
    the default ``solref = (c, 1)`` exactly. The mapping is approximate: MuJoCo's impedance
    (``solimp``) scales both terms with penetration depth.
    """
    if not 0.0 <= restitution <= 1.0:
        raise ValueError(f"restitution must lie in [0, 1], got {restitution!r}")
    if restitution == 0.0:
        return 1.0
    log_e = math.log(restitution)
    return -log_e / math.sqrt(math.pi**2 + log_e**2)
