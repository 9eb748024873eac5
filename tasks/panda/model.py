"""The Franka Emika Panda arm as a MuJoCo model, built from the numbers of MuJoCo Menagerie's Panda.

The MJCF is generated from ``panda_params.json``: every physical number of Menagerie's
``franka_emika_panda/panda_nohand.xml`` (body frames, explicit inertials, joint ranges,
armature 0.1 and damping 1.0 on every joint, the ``home`` keyframe, the flange site). The
numbers are Menagerie's under the Apache License 2.0; ``NOTICE`` beside this file says so and
what was changed:

* Geometry is primitive (capsules and cylinders) instead of Menagerie's meshes. The bodies
  carry explicit inertials, so masses and inertias, and hence the dynamics, are unchanged.
  The geoms are visual only (``contype = conaffinity = 0``): the model has no contacts, which
  keeps the dynamics smooth for trajectory optimization (the reach task keeps goals above the
  floor and near ``home``, where the arm does not meet itself).
* The arm is driven by torque motors (``<motor>``, gear 1) with Franka's published limits,
  87 Nm on joints 1–4 and 12 Nm on joints 5–7, as ``ctrlrange`` and ``forcerange``, where
  Menagerie has position servos with the same force ranges. ``ctrl`` is the joint torque.

Angles are radians (``<compiler angle="radian">``): MJCF's default is degrees, and an arm built
from these numbers without it reads every range in degrees, so every joint sits at a limit.

State layout: ``qpos (7,)`` joint angles and ``qvel (7,)`` joint velocities, joint 1 first;
``ctrl (7,)`` joint torques in the same order. The base (``link0``) is fixed at the world
origin. The flange frame is the site ``attachment_site``, 0.107 m past link 7 (Franka's hand
would add about 0.1034 m more to its fingertip centre).

Options of :func:`model_xml` / :func:`load_model`:

* ``gravity_compensation``: MuJoCo's body ``gravcomp`` on links 1–7, an applied force
  ``−Σ m_i gᵀ J_i`` (the gravity part of ``qfrc_bias``) recomputed at every physics step and
  added to the passive forces, outside the motors' limits. This is how the Panda itself is
  commanded: libfranka's torque interface adds the robot's own gravity model on top of the
  commanded torque, and the 87 / 12 Nm limits apply to the command. The payload is not
  compensated: it plays the load the robot's gravity model does not know about.
* ``payload_mass``: a solid sphere (radius :data:`PAYLOAD_RADIUS`) centred at the flange,
  welded to link 7 (body ``payload``; mass 0 by default, which changes nothing). The model is
  the arm without Franka's hand; a payload of about 0.73 kg stands in for the hand's mass.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import mujoco
import numpy as np

from diffto.tasks.panda._checks import nonneg
from diffto.tasks.rendering import SCENE_ASSETS

__all__ = [
    "PARAMS_PATH",
    "JOINT_NAMES",
    "ACTUATOR_NAMES",
    "LINK_NAMES",
    "FLANGE_SITE",
    "PAYLOAD_BODY",
    "PAYLOAD_RADIUS",
    "HOME",
    "TORQUE_LIMITS",
    "VELOCITY_LIMITS",
    "JOINT_LOWER",
    "JOINT_UPPER",
    "ARM_MASS",
    "TIMESTEP",
    "params",
    "model_xml",
    "load_model",
    "set_payload",
]

PARAMS_PATH = Path(__file__).with_name("panda_params.json")


@cache
def params() -> dict[str, Any]:
    """Menagerie's Panda numbers (parsed ``panda_params.json``; do not mutate)."""
    with open(PARAMS_PATH) as fh:
        return json.load(fh)


def _readonly(values: Any) -> np.ndarray:
    # Shared constants are read-only so no caller can corrupt them: copy before editing.
    arr = np.asarray(values, dtype=np.float64)
    arr.setflags(write=False)
    return arr


_JOINTED = [b for b in params()["bodies"] if b["joint"] is not None]
JOINT_NAMES: tuple[str, ...] = tuple(b["joint"]["name"] for b in _JOINTED)
ACTUATOR_NAMES: tuple[str, ...] = tuple(f"actuator{i}" for i in range(1, 8))
LINK_NAMES: tuple[str, ...] = tuple(b["name"] for b in params()["bodies"])
FLANGE_SITE = "attachment_site"
PAYLOAD_BODY = "payload"
PAYLOAD_RADIUS = 0.04  # m; inertia of the payload sphere, 2/5 m r² about each axis
TIMESTEP = 0.002  # s, Menagerie's (MuJoCo's default)

# ``home`` keyframe (7,) rad: the arm bent forward, flange at (0.5545, 0, 0.6245) m.
HOME: np.ndarray = _readonly(params()["keyframes"]["home"])
# Published torque limits (7,) Nm, Franka's datasheet (Menagerie's forcerange).
TORQUE_LIMITS: np.ndarray = _readonly([params()["torque_limits"][j] for j in JOINT_NAMES])
# Published joint velocity limits (7,) rad/s (not enforced by the model; for TO constraints).
VELOCITY_LIMITS: np.ndarray = _readonly(params()["published_limits_franka_datasheet"]["velocity"])
JOINT_LOWER: np.ndarray = _readonly([b["joint"]["range"][0] for b in _JOINTED])
JOINT_UPPER: np.ndarray = _readonly([b["joint"]["range"][1] for b in _JOINTED])
# Mass of the moving links 1–7 (kg), 16.062; link0, the fixed base, adds 0.63.
ARM_MASS: float = float(sum(b["inertial"]["mass"] for b in _JOINTED))

# Visual primitives: link radius (m) and colours.
_RADIUS = 0.055
_WHITE = "0.93 0.93 0.95 1"
_DARK = "0.22 0.22 0.24 1"
_VISUAL = 'contype="0" conaffinity="0" group="2"'

# Fixed camera "overview": front-left of the arm, looking at the middle of its workspace.
_CAMERA_POS = np.array([1.25, -0.95, 0.95])
_CAMERA_TARGET = np.array([0.3, 0.0, 0.45])


def _fmt(values: Any) -> str:
    """Space-separated MJCF vector with full float precision."""
    return " ".join(repr(float(v)) for v in np.atleast_1d(np.asarray(values, dtype=np.float64)))


def _camera_xyaxes() -> str:
    """Camera x and y axes (world) for a camera at ``_CAMERA_POS`` looking at ``_CAMERA_TARGET``:
    MuJoCo cameras look along their −z, so ``z = (pos − target)/‖·‖``, ``x = up × z`` (level),
    ``y = z × x``."""
    z = _CAMERA_POS - _CAMERA_TARGET
    z = z / np.linalg.norm(z)
    x = np.cross([0.0, 0.0, 1.0], z)
    x /= np.linalg.norm(x)
    return _fmt(np.concatenate([x, np.cross(z, x)]))


def _child_offsets() -> dict[str, list[float]]:
    """For each body, the offset of its child (next link or flange) in its own frame."""
    bodies = params()["bodies"]
    offsets = {b["parent"]: b["pos"] for b in bodies if b["parent"] != "world"}
    offsets[params()["attachment_site"]["parent"]] = params()["attachment_site"]["pos"]
    return offsets


def _visuals(name: str, child: list[float] | None) -> list[str]:
    """A joint housing (cylinder about the body's z axis) and a capsule to the next frame."""
    if name == "link0":
        return [
            f'<geom name="link0_visual" type="cylinder" size="0.075 0.07" pos="0 0 0.07" '
            f'rgba="{_WHITE}" {_VISUAL}/>',
            f'<geom name="link0_column" type="capsule" size="{_RADIUS!r}" '
            f'fromto="0 0 0.1 0 0 0.25" rgba="{_WHITE}" {_VISUAL}/>',
        ]
    colour = _DARK if name in ("link1", "link3", "link5", "link7") else _WHITE
    geoms = [
        f'<geom name="{name}_housing" type="cylinder" size="{_RADIUS + 0.005!r} 0.06" '
        f'rgba="{_DARK}" {_VISUAL}/>'
    ]
    if child is not None and np.linalg.norm(child) > 1e-9:
        geoms.append(
            f'<geom name="{name}_visual" type="capsule" size="{_RADIUS!r}" '
            f'fromto="0 0 0 {_fmt(child)}" rgba="{colour}" {_VISUAL}/>'
        )
    return geoms


def _arm_xml(gravity_compensation: bool, payload_mass: float) -> str:
    p = params()
    offsets = _child_offsets()
    children: dict[str, list[dict[str, Any]]] = {}
    for b in p["bodies"]:
        children.setdefault(b["parent"], []).append(b)
    site = p["attachment_site"]
    inertia = 0.4 * payload_mass * PAYLOAD_RADIUS**2

    def body_xml(b: dict[str, Any], indent: str) -> list[str]:
        inner = indent + "  "
        gravcomp = ' gravcomp="1"' if gravity_compensation and b["joint"] is not None else ""
        ine = b["inertial"]
        lines = [
            f'{indent}<body name="{b["name"]}" pos="{_fmt(b["pos"])}" '
            f'quat="{_fmt(b["quat"])}"{gravcomp}>',
            f'{inner}<inertial pos="{_fmt(ine["pos"])}" mass="{_fmt(ine["mass"])}" '
            f'fullinertia="{_fmt(ine["fullinertia"])}"/>',
        ]
        if b["joint"] is not None:
            j = b["joint"]
            lines.append(f'{inner}<joint name="{j["name"]}" range="{_fmt(j["range"])}"/>')
        lines += [inner + g for g in _visuals(b["name"], offsets.get(b["name"]))]
        if b["name"] == site["parent"]:
            lines += [
                f'{inner}<site name="{FLANGE_SITE}" pos="{_fmt(site["pos"])}" '
                f'quat="{_fmt(site["quat"])}" size="0.012" rgba="0.2 0.6 0.9 1" group="3"/>',
                f'{inner}<geom name="flange_visual" type="cylinder" size="0.045 0.008" '
                f'pos="{_fmt(np.asarray(site["pos"]) - [0, 0, 0.008])}" rgba="{_DARK}" '
                f"{_VISUAL}/>",
                # The payload is welded to the flange; gravcomp stays 0 (unknown load).
                f'{inner}<body name="{PAYLOAD_BODY}" pos="{_fmt(site["pos"])}">',
                f'{inner}  <inertial pos="0 0 0" mass="{payload_mass!r}" '
                f'diaginertia="{_fmt([inertia] * 3)}"/>',
                f"{inner}</body>",
            ]
        for child in children.get(b["name"], []):
            lines += body_xml(child, inner)
        lines.append(f"{indent}</body>")
        return lines

    (root,) = children["world"]
    return "\n".join(body_xml(root, "    "))


def _actuators_xml() -> str:
    return "\n".join(
        f'    <motor name="{a}" joint="{j}" gear="1" ctrlrange="{-tau!r} {tau!r}" '
        f'forcerange="{-tau!r} {tau!r}"/>'
        for a, j, tau in zip(ACTUATOR_NAMES, JOINT_NAMES, TORQUE_LIMITS.tolist(), strict=True)
    )


def model_xml(
    timestep: float = TIMESTEP,
    *,
    gravity_compensation: bool = False,
    payload_mass: float = 0.0,
    scene: bool = True,
) -> str:
    """The Panda MJCF as a string.

    Args:
        timestep: physics step in seconds (default 0.002, Menagerie's).
        gravity_compensation: compensate the gravity of links 1–7 inside the physics (body
            ``gravcomp``, see the module docstring); ``ctrl`` is then the torque on top of it.
        payload_mass: kg at the flange (body ``payload``, a sphere of radius
            :data:`PAYLOAD_RADIUS` centred on the flange), ``>= 0``.
        scene: add a floor (visual only), lights, a sky, the fixed camera ``"overview"`` and
            a world site ``"goal"`` (a red sphere, for showing a reach target). Without it only
            the arm, its motors and the ``home`` keyframe are emitted.

    Options kept from Menagerie: integrator ``implicitfast``, ``impratio`` 10.
    """
    if isinstance(timestep, bool) or not isinstance(timestep, int | float):
        raise ValueError(f"timestep must be a positive float (seconds), got {timestep!r}")
    if not np.isfinite(timestep) or timestep <= 0:
        raise ValueError(f"timestep must be a positive float (seconds), got {timestep!r}")
    if not isinstance(gravity_compensation, bool):
        raise ValueError(f"gravity_compensation must be a bool, got {gravity_compensation!r}")
    payload_mass = nonneg("payload_mass", payload_mass)
    defaults = params()["joint_defaults"]
    parts = [
        '<mujoco model="panda">',
        '  <compiler angle="radian" autolimits="true"/>',
        f'  <option timestep="{float(timestep)!r}" integrator="implicitfast" impratio="10"/>',
        '  <statistic center="0.3 0 0.4" extent="1.0"/>',
        "  <visual>",
        '    <headlight diffuse="0.5 0.5 0.5" ambient="0.35 0.35 0.35" specular="0 0 0"/>',
        '    <global azimuth="150" elevation="-20" offwidth="1280" offheight="720"/>',
        "  </visual>",
        "  <default>",
        f'    <joint axis="{_fmt(defaults["axis"])}" armature="{_fmt(defaults["armature"])}" '
        f'damping="{_fmt(defaults["damping"])}"/>',
        "  </default>",
    ]
    if scene:
        parts.append(SCENE_ASSETS)
    parts.append("  <worldbody>")
    if scene:
        parts += [
            '    <light name="sun" pos="0 0 3" dir="0 0 -1" directional="true" '
            'diffuse="0.6 0.6 0.6" specular="0.1 0.1 0.1" castshadow="false"/>',
            '    <light name="spot" pos="1 -1 2.5" dir="-0.4 0.4 -1" diffuse="0.5 0.5 0.5" '
            'cutoff="60"/>',
            '    <geom name="floor" type="plane" size="2 2 0.05" material="floor" '
            'contype="0" conaffinity="0"/>',
            f'    <camera name="overview" pos="{_fmt(_CAMERA_POS)}" xyaxes="{_camera_xyaxes()}" '
            'fovy="45"/>',
            '    <site name="goal" pos="0.5545 0 0.6245" size="0.02" rgba="0.9 0.15 0.1 0.8" '
            'group="0"/>',
        ]
    parts += [
        _arm_xml(gravity_compensation, payload_mass),
        "  </worldbody>",
        "  <actuator>",
        _actuators_xml(),
        "  </actuator>",
        "  <keyframe>",
        f'    <key name="home" qpos="{_fmt(HOME)}" ctrl="{_fmt(np.zeros(7))}"/>',
        "  </keyframe>",
        "</mujoco>",
    ]
    return "\n".join(parts) + "\n"


def load_model(
    timestep: float = TIMESTEP,
    *,
    gravity_compensation: bool = False,
    payload_mass: float = 0.0,
    scene: bool = True,
) -> mujoco.MjModel:
    """The compiled Panda: nq = nv = nu = 7 (layout in the module docstring).

    Arguments as in :func:`model_xml`. ``model.key("home")`` holds :data:`HOME`; use
    ``mujoco.mj_resetDataKeyframe(model, data, 0)`` to start there.
    """
    return mujoco.MjModel.from_xml_string(
        model_xml(
            timestep,
            gravity_compensation=gravity_compensation,
            payload_mass=payload_mass,
            scene=scene,
        )
    )


def set_payload(model: mujoco.MjModel, mass: float) -> None:
    """Change the payload mass (kg) of a compiled Panda model in place.

    Sets the mass and the sphere inertia of body ``payload`` and recomputes the model's
    derived constants (``mj_setConst``, e.g. subtree masses, on a scratch ``MjData``: it
    overwrites the state of the data it is given). The forward dynamics read ``body_mass`` and
    ``body_inertia`` directly.
    """
    mass = nonneg("mass", mass)
    bid = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_BODY, PAYLOAD_BODY)
    if bid < 0:
        raise ValueError(f"model has no body {PAYLOAD_BODY!r}: is it a model from load_model?")
    model.body_mass[bid] = mass
    model.body_inertia[bid] = 0.4 * mass * PAYLOAD_RADIUS**2
    mujoco.mj_setConst(model, mujoco.MjData(model))
