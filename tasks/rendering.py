"""Offscreen MuJoCo rendering for the environments' videos, with a clear error where there is none.

MuJoCo fixes its OpenGL back-end (``MUJOCO_GL``) when ``mujoco`` is first imported. On a
headless Linux machine only OSMesa (or EGL with a GPU) renders; the ``diffto`` command and the
environment workers choose OSMesa there (:func:`diffto.tasks.registry.use_osmesa_if_headless`).
Environments call :func:`make_renderer` lazily, so stepping never depends on rendering.
:func:`add_ghost` draws a second pose of the robot (a tracking reference) into the same frame
as a translucent copy.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import mujoco

__all__ = ["RenderingUnavailableError", "make_renderer", "add_ghost", "GHOST_RGB", "SCENE_ASSETS"]

# Light blue: apart from the robots' greys and the floor's slate, and bright enough to read
# through at alpha 0.3 against the dark checker floor.
GHOST_RGB = (0.35, 0.7, 1.0)

# Sky, checker floor texture and material shared by the robots' scenes (MJCF <asset> block).
SCENE_ASSETS = """\
  <asset>
    <texture name="sky" type="skybox" builtin="gradient" rgb1="0.45 0.6 0.75" rgb2="0.05 0.05 0.08"
      width="256" height="1536"/>
    <texture name="grid" type="2d" builtin="checker" mark="edge" rgb1="0.22 0.26 0.30"
      rgb2="0.16 0.19 0.22" markrgb="0.7 0.7 0.7" width="300" height="300"/>
    <material name="floor" texture="grid" texuniform="true" texrepeat="4 4" reflectance="0.1"/>
  </asset>"""

_ADVICE = (
    "On a headless Linux machine install OSMesa (Debian: libosmesa6) and set MUJOCO_GL=osmesa "
    "(or egl) before anything imports mujoco (the diffto command does; in a script, call "
    "diffto.tasks.registry.use_osmesa_if_headless() first)."
)


class RenderingUnavailableError(RuntimeError):
    """MuJoCo could not create an offscreen GL context (no display, no OSMesa/EGL)."""


def make_renderer(
    model: mujoco.MjModel, height: int, width: int, max_geom: int = 10_000
) -> mujoco.Renderer:
    """A ``mujoco.Renderer``, or :class:`RenderingUnavailableError` saying why there is none.

    ``max_geom`` is the scene's capacity (MuJoCo's default): a frame with a ghost
    (:func:`add_ghost`) holds the robot's geoms twice.
    """
    backend = mujoco.gl_context.GLContext.__module__.rsplit(".", 1)[-1]
    if backend == "glfw" and not os.environ.get("DISPLAY"):
        raise RenderingUnavailableError(f"MuJoCo uses GLFW but there is no DISPLAY. {_ADVICE}")
    renderer = mujoco.Renderer.__new__(mujoco.Renderer)
    try:
        renderer.__init__(model, height, width, max_geom=max_geom)
    except Exception as err:  # GL back-ends raise assorted types
        # A half-built Renderer would raise again from __del__: give close() what it reads.
        renderer.__dict__.setdefault("_gl_context", None)
        renderer.__dict__.setdefault("_mjr_context", None)
        raise RenderingUnavailableError(
            f"MuJoCo ({backend} back-end) could not create an offscreen rendering context: "
            f"{err}. {_ADVICE}"
        ) from err
    return renderer


def add_ghost(
    scene: mujoco.MjvScene,
    model: mujoco.MjModel,
    data: mujoco.MjData,
    rgba: Sequence[float],
) -> int:
    """Add the geoms of ``model`` at the pose in ``data`` to ``scene``, all coloured ``rgba``.

    Call after ``Renderer.update_scene`` and before ``Renderer.render``; ``data`` needs current
    body poses (``mujoco.mj_kinematics``). Only geoms of moving bodies are drawn
    (``mjCAT_DYNAMIC``): the floor and everything else on the world body stay single. MuJoCo
    draws geoms with alpha below 1 after the opaque ones and without writing depth: the robot
    shows through a translucent ghost in front of it and hides the parts behind it. The ghost
    casts no shadow. Returns the number of geoms added.

    Raises:
        ValueError: ``rgba`` is not 4 numbers in [0, 1], or ``scene`` lacks room for
            ``model.ngeom`` more geoms (``scene.maxgeom``, see :func:`make_renderer`).
    """
    rgba = tuple(float(c) for c in rgba)
    if len(rgba) != 4 or not all(0.0 <= c <= 1.0 for c in rgba):
        raise ValueError(f"rgba must be 4 numbers in [0, 1], got {rgba!r}")
    start = scene.ngeom
    # Checked here: MuJoCo would only log a warning and drop the geoms that do not fit.
    if start + model.ngeom > scene.maxgeom:
        raise ValueError(f"the scene has no room for a ghost of {model.ngeom} geoms: maxgeom "
                         f"{scene.maxgeom} holds {start} already; make the renderer with a "
                         "larger max_geom")
    mujoco.mjv_addGeoms(model, data, mujoco.MjvOption(), mujoco.MjvPerturb(),
                        mujoco.mjtCatBit.mjCAT_DYNAMIC, scene)
    for geom in scene.geoms[start:scene.ngeom]:
        geom.rgba = rgba
        geom.reflectance = 0.0  # MuJoCo allows one reflective geom (the floor)
        # Decoration casts no shadow: an opaque shadow of a translucent ghost would read as
        # a second robot.
        geom.category = mujoco.mjtCatBit.mjCAT_DECOR
    return scene.ngeom - start
