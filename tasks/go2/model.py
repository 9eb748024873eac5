"""The Unitree Go2 quadruped as a MuJoCo model, built from the numbers of MuJoCo Menagerie's Go2.

The MJCF is generated from ``go2_params.json`` (every physical number of Menagerie's
``unitree_go2/go2.xml`` at commit 2ffe3e33: inertials, joints, limits, armature, damping,
frictionloss, the 23 collision primitives with their contact parameters, actuators, the
``home`` keyframe). Menagerie's visual meshes carry no mass (bodies have explicit inertials),
so this model, with primitive shapes as visuals, has the same physics arrays as the original.
The numbers are Unitree Robotics' under the BSD-3-Clause licence in ``LICENSE.go2``.

State layout (MuJoCo's free joint followed by the 12 leg hinges)::

    qpos (19,) = [base position (3, world),
                  base quaternion (4, w x y z, body -> world),
                  joint angles (12, JOINT_NAMES order)]
    qvel (18,) = [base linear velocity (3, world frame),
                  base angular velocity (3, BODY frame),
                  joint velocities (12, JOINT_NAMES order)]

Joint (qpos) order is FL, FR, RL, RR x (hip, thigh, calf). The actuators keep Menagerie's
order FR, FL, RR, RL; :func:`actuator_joint_order` maps them through ``actuator_trnid``.

Besides the robot the scene has a checker floor, lights, a camera ``"track"`` that follows
the trunk (for videos) and a site ``"<leg>_foot"`` at each foot-sphere centre (the foot point
of the leg model in :mod:`diffto.tasks.go2.legs`).
"""

from __future__ import annotations

import json
import os
from functools import cache
from pathlib import Path
from typing import Any

import mujoco
import numpy as np

from diffto.tasks.rendering import SCENE_ASSETS

__all__ = [
    "JOINT_NAMES",
    "FOOT_NAMES",
    "LEG_NAMES",
    "FOOT_SITE_NAMES",
    "HOME_QPOS",
    "QPOS_JOINTS",
    "QVEL_JOINTS",
    "TOTAL_MASS",
    "PARAMS_PATH",
    "params",
    "model_xml",
    "load_model",
    "foot_geom_ids",
    "foot_site_ids",
    "actuator_joint_order",
    "torque_limits",
]

PARAMS_PATH = Path(__file__).with_name("go2_params.json")

LEG_NAMES: tuple[str, ...] = ("FL", "FR", "RL", "RR")
FOOT_NAMES: tuple[str, ...] = LEG_NAMES
FOOT_SITE_NAMES: tuple[str, ...] = tuple(f"{leg}_foot" for leg in LEG_NAMES)
JOINT_NAMES: tuple[str, ...] = tuple(
    f"{leg}_{part}_joint" for leg in LEG_NAMES for part in ("hip", "thigh", "calf")
)


@cache
def params() -> dict[str, Any]:
    """The Menagerie Go2 numbers (parsed ``go2_params.json``; do not mutate)."""
    with open(PARAMS_PATH) as fh:
        return json.load(fh)


QPOS_JOINTS = slice(7, 19)  # joint angles inside qpos (19,)
QVEL_JOINTS = slice(6, 18)  # joint velocities inside qvel (18,)
# The ``home`` keyframe (19,): base at z 0.27, joints (0, 0.9, -1.8) per leg. Read-only so a
# shared constant cannot be corrupted: copy it (``HOME_QPOS.copy()``, ``torch.tensor(...)``)
# before editing; ``torch.from_numpy`` would warn about the read-only buffer.
HOME_QPOS: np.ndarray = np.asarray(params()["keyframe_home"]["qpos"], dtype=np.float64)
HOME_QPOS.setflags(write=False)
TOTAL_MASS: float = float(sum(b["inertial"]["mass"] for b in params()["bodies"]))

# Primitive visuals (group 2, no contact, no mass: the bodies carry explicit inertials).
_RGBA = {
    "body": "0.78 0.79 0.81 1",
    "dark": "0.12 0.12 0.13 1",
    "joint": "0.30 0.31 0.33 1",
    "foot": "0.05 0.05 0.05 1",
    "eye": "0.35 0.65 0.95 1",
}


# Tracking camera (mode trackcom: follows the trunk's centre of mass, world-fixed orientation):
# 1.1 m from the trunk, front-right, looking down about 18 degrees at it.
_TRACK_POS = (0.45, -0.95, 0.35)
_TRACK_FOVY = 50.0


def _track_quat() -> np.ndarray:
    """Camera orientation looking at the trunk from ``_TRACK_POS``: camera -z toward the
    target, camera x horizontal, camera y up-ish (MuJoCo camera convention)."""
    z = np.asarray(_TRACK_POS) / np.linalg.norm(_TRACK_POS)  # camera looks along -z
    x = np.cross([0.0, 0.0, 1.0], z)
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    quat = np.empty(4)
    mujoco.mju_mat2Quat(quat, np.column_stack([x, y, z]).reshape(-1))
    return quat


def _fmt(values: Any) -> str:
    """Space-separated MJCF vector with full float precision."""
    arr = np.atleast_1d(np.asarray(values, dtype=np.float64))
    return " ".join(repr(float(v)) for v in arr)


def _visuals(body: str) -> list[str]:
    """Primitive visual geoms for one body, shaped after the collision primitives."""
    vis = 'contype="0" conaffinity="0" group="2" density="0"'
    if body == "base":
        return [
            f'<geom name="trunk_visual" type="box" size="0.19 0.055 0.05" '
            f'rgba="{_RGBA["body"]}" {vis}/>',
            f'<geom name="head_visual" type="box" size="0.035 0.045 0.04" pos="0.225 0 0.01" '
            f'rgba="{_RGBA["dark"]}" {vis}/>',
            f'<geom name="eyes_visual" type="box" size="0.004 0.03 0.012" pos="0.261 0 0.02" '
            f'rgba="{_RGBA["eye"]}" {vis}/>',
            f'<geom name="lidar_visual" type="cylinder" size="0.03 0.02" pos="0.285 0 0.055" '
            f'rgba="{_RGBA["dark"]}" {vis}/>',
        ]
    leg, part = body.split("_")
    side = 1.0 if leg[1] == "L" else -1.0
    if part == "hip":
        return [
            f'<geom name="{body}_visual" type="cylinder" size="0.045 0.025" '
            f'pos="0 {0.055 * side!r} 0" quat="1 1 0 0" rgba="{_RGBA["joint"]}" {vis}/>'
        ]
    if part == "thigh":
        return [
            f'<geom name="{body}_visual" type="capsule" size="0.022" fromto="0 0 0 0 0 -0.2" '
            f'rgba="{_RGBA["body"]}" {vis}/>'
        ]
    return [
        f'<geom name="{body}_visual" type="capsule" size="0.014" fromto="0 0 0 -0.002 0 -0.19" '
        f'rgba="{_RGBA["dark"]}" {vis}/>',
        f'<geom name="{leg}_foot_visual" type="sphere" size="0.022" pos="-0.002 0 -0.213" '
        f'rgba="{_RGBA["foot"]}" {vis}/>',
    ]


def _collision_geom(g: dict[str, Any]) -> str:
    """One collision primitive with every contact parameter written out (no classes)."""
    name = f'name="{g["name"]}" ' if g.get("name") else ""
    return (
        f'<geom {name}type="{g["type"]}" size="{_fmt(g["size"])}" pos="{_fmt(g["pos"])}" '
        f'quat="{_fmt(g["quat"])}" friction="{_fmt(g["friction"])}" '
        f'condim="{int(g["condim"])}" margin="{_fmt(g["margin"])}" '
        f'priority="{int(g["priority"])}" solimp="{_fmt(g["solimp"])}" '
        f'solref="{_fmt(g["solref"])}" contype="{int(g["contype"])}" '
        f'conaffinity="{int(g["conaffinity"])}" group="{int(g["group"])}"/>'
    )


def _robot_body_xml(p: dict[str, Any]) -> str:
    """The ``base`` body subtree: inertials, joints, collision and visual geoms, sites."""
    joints_by_body = {j["body"]: j for j in p["joints"]}
    geoms_by_body: dict[str, list[dict[str, Any]]] = {}
    for g in p["collision_geoms"]:
        geoms_by_body.setdefault(g["body"], []).append(g)
    sites_by_body: dict[str, list[dict[str, Any]]] = {}
    for s in p["sites"]:
        sites_by_body.setdefault(s["body"], []).append(s)
    children: dict[str, list[dict[str, Any]]] = {}
    for b in p["bodies"]:
        children.setdefault(b["parent"], []).append(b)

    def body_xml(b: dict[str, Any], indent: str) -> list[str]:
        inner = indent + "  "
        ine = b["inertial"]
        lines = [
            f'{indent}<body name="{b["name"]}" pos="{_fmt(b["pos"])}" quat="{_fmt(b["quat"])}">'
        ]
        lines.append(
            f'{inner}<inertial pos="{_fmt(ine["pos"])}" quat="{_fmt(ine["quat"])}" '
            f'mass="{_fmt(ine["mass"])}" diaginertia="{_fmt(ine["diaginertia"])}"/>'
        )
        if b.get("freejoint"):
            lines.append(f'{inner}<freejoint name="root"/>')
            lines.append(
                f'{inner}<camera name="track" mode="trackcom" pos="{_fmt(_TRACK_POS)}" '
                f'quat="{_fmt(_track_quat())}" fovy="{_TRACK_FOVY!r}"/>'
            )
        if b["name"] in joints_by_body:
            j = joints_by_body[b["name"]]
            lines.append(
                f'{inner}<joint name="{j["name"]}" type="{j["type"]}" pos="{_fmt(j["pos"])}" '
                f'axis="{_fmt(j["axis"])}" range="{_fmt(j["range"])}" limited="true" '
                f'damping="{_fmt(j["damping"])}" armature="{_fmt(j["armature"])}" '
                f'frictionloss="{_fmt(j["frictionloss"])}"/>'
            )
        lines += [inner + _collision_geom(g) for g in geoms_by_body.get(b["name"], [])]
        lines += [inner + v for v in _visuals(b["name"])]
        for s in sites_by_body.get(b["name"], []):
            lines.append(
                f'{inner}<site name="{s["name"]}" pos="{_fmt(s["pos"])}" size="0.01" group="5"/>'
            )
        for g in geoms_by_body.get(b["name"], []):
            if g.get("name") in LEG_NAMES:  # foot-sphere centre: end frame for leg kinematics
                lines.append(
                    f'{inner}<site name="{g["name"]}_foot" pos="{_fmt(g["pos"])}" size="0.005" '
                    'group="5"/>'
                )
        for child in children.get(b["name"], []):
            lines += body_xml(child, inner)
        lines.append(f"{indent}</body>")
        return lines

    (root,) = children["world"]
    return "\n".join(body_xml(root, "    "))


def _actuators_xml(p: dict[str, Any]) -> str:
    return "\n".join(
        f'    <motor name="{a["name"]}" joint="{a["joint"]}" gear="{_fmt(a["gear"])}" '
        f'ctrlrange="{_fmt(a["ctrlrange"])}" ctrllimited="true"/>'
        for a in p["actuators"]
    )


def _floor_xml(p: dict[str, Any]) -> str:
    f = p["scene"]["floor"]
    return (
        f'    <geom name="floor" type="plane" size="{_fmt(f["size"])}" '
        f'friction="{_fmt(f["friction"])}" condim="{int(f["condim"])}" '
        f'priority="{int(f["priority"])}" material="floor"/>'
    )


_LIGHTS = """\
    <light name="sun" pos="0 0 4" dir="0 0 -1" directional="true" diffuse="0.6 0.6 0.6"
      specular="0.1 0.1 0.1" castshadow="false"/>
    <light name="spot" mode="trackcom" pos="0 -1.5 2.5" dir="0 0.5 -1" diffuse="0.5 0.5 0.5"
      cutoff="60"/>"""


def _check_timestep(timestep: float) -> float:
    if not isinstance(timestep, int | float) or not np.isfinite(timestep) or timestep <= 0:
        raise ValueError(f"timestep must be a positive finite float (seconds), got {timestep!r}")
    return float(timestep)


def model_xml(timestep: float = 0.001, *, scene: bool = True) -> str:
    """The Go2 MJCF as a string.

    Args:
        timestep: physics step in seconds (default 1 ms; Menagerie leaves MuJoCo's 2 ms).
        scene: add floor, lights and sky around the robot. With ``scene=False`` only the
            robot (with its ``track`` camera and foot sites), its actuators and the ``home``
            keyframe are emitted, e.g. for kinematics or to embed the Go2 in another scene.

    Options kept from Menagerie: elliptic friction cone, impratio 100, Euler integrator,
    Newton solver (100 iterations, 50 line-search iterations), gravity -9.81 z.
    """
    timestep = _check_timestep(timestep)
    p = params()
    opt = p["option"]
    home = p["keyframe_home"]
    parts = [
        '<mujoco model="go2">',
        f'  <compiler angle="{p["compiler"]["angle"]}" autolimits="true"/>',
        f'  <option timestep="{timestep!r}" cone="{opt["cone"]}" '
        f'impratio="{_fmt(opt["impratio"])}" '
        f'iterations="{int(opt["iterations"])}" ls_iterations="{int(opt["ls_iterations"])}" '
        f'gravity="{_fmt(opt["gravity"])}"/>',
        '  <statistic center="0 0 0.2" extent="0.8"/>',
        "  <visual>",
        '    <headlight diffuse="0.5 0.5 0.5" ambient="0.35 0.35 0.35" specular="0 0 0"/>',
        '    <global azimuth="-130" elevation="-20" offwidth="1280" offheight="720"/>',
        "  </visual>",
    ]
    if scene:
        parts.append(SCENE_ASSETS)
    parts.append("  <worldbody>")
    if scene:
        parts += [_LIGHTS, _floor_xml(p)]
    parts += [
        _robot_body_xml(p),
        "  </worldbody>",
        "  <actuator>",
        _actuators_xml(p),
        "  </actuator>",
        "  <keyframe>",
        f'    <key name="home" qpos="{_fmt(home["qpos"])}" ctrl="{_fmt(home["ctrl"])}"/>',
        "  </keyframe>",
        "</mujoco>",
    ]
    return "\n".join(parts) + "\n"


def _menagerie_go2_xml(required: bool) -> Path | None:
    """``$MENAGERIE_ROOT/unitree_go2/go2.xml`` if it exists; raise if ``required`` and not."""
    root = os.environ.get("MENAGERIE_ROOT")
    path = Path(root) / "unitree_go2" / "go2.xml" if root else None
    if path is not None and path.is_file():
        return path
    if required:
        raise ValueError(
            "meshes=True needs MuJoCo Menagerie on disk: set MENAGERIE_ROOT to a folder holding "
            f"unitree_go2/go2.xml (MENAGERIE_ROOT={root!r}); or pass meshes=False for the "
            "embedded primitive model"
        )
    return None


def _load_menagerie(path: Path, timestep: float) -> mujoco.MjModel:
    """Menagerie's go2.xml (with meshes), wrapped with the same floor, lights, camera, foot
    sites and timestep as the embedded model."""
    spec = mujoco.MjSpec.from_file(str(path))
    spec.option.timestep = timestep
    p = params()
    # Scene pieces are parsed from the embedded model's own XML so both paths agree.
    scene = mujoco.MjSpec.from_string(model_xml(timestep))
    for tex in scene.textures:
        if spec.texture(tex.name) is None:
            t = spec.add_texture(name=tex.name, type=tex.type, builtin=tex.builtin)
            t.rgb1, t.rgb2, t.mark, t.markrgb = tex.rgb1, tex.rgb2, tex.mark, tex.markrgb
            t.width, t.height = tex.width, tex.height
    if spec.material("floor") is None:
        mat = spec.add_material(name="floor", texrepeat=[4, 4], texuniform=True, reflectance=0.1)
        mat.textures[mujoco.mjtTextureRole.mjTEXROLE_RGB] = "grid"
    world = spec.worldbody
    f = p["scene"]["floor"]
    world.add_geom(
        name="floor",
        type=mujoco.mjtGeom.mjGEOM_PLANE,
        size=f["size"],
        friction=f["friction"],
        condim=f["condim"],
        priority=f["priority"],
        material="floor",
    )
    world.add_light(
        name="sun",
        pos=[0, 0, 4],
        dir=[0, 0, -1],
        directional=True,
        diffuse=[0.6] * 3,
        castshadow=False,
    )
    world.add_light(
        name="spot",
        mode=mujoco.mjtCamLight.mjCAMLIGHT_TRACKCOM,
        pos=[0, -1.5, 2.5],
        dir=[0, 0.5, -1],
        diffuse=[0.5] * 3,
        cutoff=60,
    )
    if spec.camera("track") is None:
        spec.body("base").add_camera(
            name="track",
            mode=mujoco.mjtCamLight.mjCAMLIGHT_TRACKCOM,
            pos=_TRACK_POS,
            quat=_track_quat(),
            fovy=_TRACK_FOVY,
        )
    for g in p["collision_geoms"]:
        if g.get("name") in LEG_NAMES and spec.site(f"{g['name']}_foot") is None:
            spec.body(g["body"]).add_site(
                name=f"{g['name']}_foot", pos=g["pos"], size=[0.005] * 3, group=5
            )
    return spec.compile()


def load_model(timestep: float = 0.001, meshes: bool | None = None) -> mujoco.MjModel:
    """The Go2 with floor, lights, tracking camera ``"track"`` and the ``home`` keyframe.

    Args:
        timestep: physics step in seconds (default 1 ms).
        meshes: ``False``: the embedded primitive model (default when ``MENAGERIE_ROOT`` is
            unset). ``True``: Menagerie's ``unitree_go2/go2.xml`` under ``$MENAGERIE_ROOT``
            (with its meshes), wrapped with the same scene; raises ``ValueError`` if absent.
            ``None``: Menagerie's model if ``$MENAGERIE_ROOT`` holds it, else the embedded one.

    Returns:
        ``mujoco.MjModel`` with nq 19, nv 18, nu 12 (layout in the module docstring).
    """
    timestep = _check_timestep(timestep)
    if meshes not in (None, True, False):
        raise ValueError(f"meshes must be True, False or None, got {meshes!r}")
    path = _menagerie_go2_xml(required=meshes is True) if meshes is not False else None
    if path is not None:
        return _load_menagerie(path, timestep)
    return mujoco.MjModel.from_xml_string(model_xml(timestep))


def _named_ids(model: mujoco.MjModel, obj: mujoco.mjtObj, names: tuple[str, ...]) -> np.ndarray:
    ids = np.array([mujoco.mj_name2id(model, obj, n) for n in names], dtype=np.int64)
    if (ids < 0).any():
        missing = [n for n, i in zip(names, ids, strict=True) if i < 0]
        raise ValueError(f"model has no {obj.name} named {missing}: is it a Go2 model?")
    return ids


def foot_geom_ids(model: mujoco.MjModel) -> np.ndarray:
    """Geom ids ``(4,)`` of the foot spheres, in FOOT_NAMES order (FL, FR, RL, RR)."""
    return _named_ids(model, mujoco.mjtObj.mjOBJ_GEOM, FOOT_NAMES)


def foot_site_ids(model: mujoco.MjModel) -> np.ndarray:
    """Site ids ``(4,)`` at the foot-sphere centres, in FOOT_NAMES order."""
    return _named_ids(model, mujoco.mjtObj.mjOBJ_SITE, FOOT_SITE_NAMES)


def actuator_joint_order(model: mujoco.MjModel) -> np.ndarray:
    """For each actuator ``i``, the index ``(0..11)`` in JOINT_NAMES order of the joint it drives.

    Returns ``(nu,) = (12,)`` int array ``a2j``: a torque vector ``tau`` in joint order is
    applied as ``data.ctrl[:] = tau[a2j]``; an actuator-order vector ``c`` maps back by
    ``tau[a2j] = c``. Read from ``actuator_trnid`` (never from positions in the file).
    """
    joint_ids = _named_ids(model, mujoco.mjtObj.mjOBJ_JOINT, JOINT_NAMES)
    if model.nu != len(JOINT_NAMES):
        raise ValueError(f"model must have {len(JOINT_NAMES)} actuators, got nu={model.nu}")
    if (model.actuator_trntype != mujoco.mjtTrn.mjTRN_JOINT).any():
        raise ValueError("every actuator must drive a joint (actuator_trntype mjTRN_JOINT)")
    lookup = {int(j): k for k, j in enumerate(joint_ids)}
    targets = model.actuator_trnid[:, 0]
    if not set(int(t) for t in targets) == set(lookup):
        raise ValueError("actuators must drive exactly the 12 leg joints, one each")
    return np.array([lookup[int(t)] for t in targets], dtype=np.int64)


def torque_limits(model: mujoco.MjModel) -> np.ndarray:
    """Symmetric torque limits ``(12,)`` in Nm, JOINT_NAMES order (23.7 hip/thigh, 45.43 knee).

    Taken from ``actuator_ctrlrange`` (times ``|gear|``) through :func:`actuator_joint_order`.
    """
    a2j = actuator_joint_order(model)
    limits = np.empty(len(JOINT_NAMES))
    ctrl = np.abs(model.actuator_ctrlrange).max(axis=1) * np.abs(model.actuator_gear[:, 0])
    limits[a2j] = ctrl
    return limits
