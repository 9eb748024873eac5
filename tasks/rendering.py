"""Offscreen MuJoCo rendering for the environments' videos, with a clear error where there is none.

MuJoCo fixes its OpenGL back-end (``MUJOCO_GL``) when ``mujoco`` is first imported. On a
headless Linux machine only OSMesa (or EGL with a GPU) renders; the ``diffto`` command and the
environment workers choose OSMesa there (:func:`diffto.tasks.registry.use_osmesa_if_headless`).
Environments call :func:`make_renderer` lazily, so stepping never depends on rendering.
"""

from __future__ import annotations

import os

import mujoco

__all__ = ["RenderingUnavailableError", "make_renderer", "SCENE_ASSETS"]

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


def make_renderer(model: mujoco.MjModel, height: int, width: int) -> mujoco.Renderer:
    """A ``mujoco.Renderer``, or :class:`RenderingUnavailableError` saying why there is none."""
    backend = mujoco.gl_context.GLContext.__module__.rsplit(".", 1)[-1]
    if backend == "glfw" and not os.environ.get("DISPLAY"):
        raise RenderingUnavailableError(f"MuJoCo uses GLFW but there is no DISPLAY. {_ADVICE}")
    renderer = mujoco.Renderer.__new__(mujoco.Renderer)
    try:
        renderer.__init__(model, height, width)
    except Exception as err:  # GL back-ends raise assorted types
        # A half-built Renderer would raise again from __del__: give close() what it reads.
        renderer.__dict__.setdefault("_gl_context", None)
        renderer.__dict__.setdefault("_mjr_context", None)
        raise RenderingUnavailableError(
            f"MuJoCo ({backend} back-end) could not create an offscreen rendering context: "
            f"{err}. {_ADVICE}"
        ) from err
    return renderer
