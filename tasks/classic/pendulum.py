"""A torque-driven pendulum as a differentiable discrete-time dynamics module.

State ``x = (θ, ω)`` with ``θ`` the angle from the upright position (``θ = 0`` is upright,
``θ = ±π`` hangs down) and ``ω = θ̇``; control ``u = (τ,)`` a torque at the pivot. With a point
mass ``m`` at distance ``l``, gravity ``g`` and viscous damping ``b`` at the pivot,

.. math::

    m l^2 \\ddot θ = m g l \\sin θ - b ω + τ .

The continuous dynamics are integrated over one step ``dt`` with classic RK4 (default) or
semi-implicit (symplectic) Euler. Physical parameters named in ``learnable`` are
``nn.Parameter`` s, so gradients of anything computed from a rollout or a solver plan
(:class:`diffto.layers.MPC` differentiates through the dynamics module) reach them; the others
are buffers and move with ``.to(device)`` without being trained.

This file also holds :func:`integrate`, the one-step integrator shared by the classic systems.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

__all__ = ["Pendulum", "integrate", "rollout", "Integrator"]

Integrator = Literal["rk4", "semi_implicit_euler"]


def integrate(
    derivative: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    u: Tensor,
    dt: float,
    integrator: Integrator = "rk4",
) -> Tensor:
    """One step of ``ẋ = derivative(x, u)`` with ``u`` held constant (zero-order hold).

    Args:
        derivative: ``(x (B, n), u (B, m)) -> ẋ (B, n)``.
        x: ``(B, n)`` state; for ``"semi_implicit_euler"`` it must be ``[q; q̇]`` with
            positions in the first half and their velocities in the second.
        u: ``(B, m)`` control.
        dt: step length.
        integrator: ``"rk4"`` (4th order, explicit) or ``"semi_implicit_euler"`` (1st order,
            symplectic: velocities are updated first and positions use the new velocities).

    Returns:
        ``(B, n)`` next state.
    """
    if integrator == "rk4":
        # x_{k+1} = x_k + dt/6 (k1 + 2 k2 + 2 k3 + k4)
        k1 = derivative(x, u)
        k2 = derivative(x + 0.5 * dt * k1, u)
        k3 = derivative(x + 0.5 * dt * k2, u)
        k4 = derivative(x + dt * k3, u)
        return x + (dt / 6.0) * (k1 + 2.0 * k2 + 2.0 * k3 + k4)
    if integrator == "semi_implicit_euler":
        # q̇_{k+1} = q̇_k + dt q̈(q_k, q̇_k, u);  q_{k+1} = q_k + dt q̇_{k+1}
        half = x.shape[-1] // 2
        qdd = derivative(x, u)[..., half:]
        qd_next = x[..., half:] + dt * qdd
        q_next = x[..., :half] + dt * qd_next
        return torch.cat([q_next, qd_next], dim=-1)
    raise ValueError(f"integrator must be 'rk4' or 'semi_implicit_euler', got {integrator!r}")


def _check_step_inputs(x: Tensor, u: Tensor, n: int, m: int) -> None:
    if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[-1] != n:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x must have shape (B, {n}), got {shape}")
    if not isinstance(u, Tensor) or u.dim() != 2 or u.shape[-1] != m:
        shape = tuple(u.shape) if isinstance(u, Tensor) else type(u).__name__
        raise ValueError(f"u must have shape (B, {m}), got {shape}")
    if u.shape[0] != x.shape[0]:
        raise ValueError(f"x and u must share the batch size, got {x.shape[0]} and {u.shape[0]}")


class _PhysicalSystem(nn.Module):
    """Holds named positive physical parameters, each a parameter or a buffer, and the
    integration settings ``dt`` and ``integrator``."""

    def _set_integration(self, dt: float, integrator: Integrator) -> None:
        if not dt > 0:
            raise ValueError(f"dt must be > 0, got {dt}")
        if integrator not in ("rk4", "semi_implicit_euler"):
            raise ValueError(
                f"integrator must be 'rk4' or 'semi_implicit_euler', got {integrator!r}"
            )
        self.dt = float(dt)
        self.integrator: Integrator = integrator

    def _register_physical(
        self, values: dict[str, float], learnable: Sequence[str], nonnegative: Sequence[str] = ()
    ) -> None:
        unknown = set(learnable) - set(values)
        if unknown:
            raise ValueError(
                f"learnable must name parameters among {sorted(values)}, got {sorted(unknown)}"
            )
        for name, value in values.items():
            ok = value >= 0 if name in nonnegative else value > 0
            if not math.isfinite(value) or not ok:
                bound = ">= 0" if name in nonnegative else "> 0"
                raise ValueError(f"{name} must be finite and {bound}, got {value}")
            tensor = torch.tensor(float(value), dtype=torch.get_default_dtype())
            if name in learnable:
                self.register_parameter(name, nn.Parameter(tensor))
            else:
                self.register_buffer(name, tensor)

    def physical_parameters(self) -> dict[str, float]:
        """Current values of the physical parameters as plain floats."""
        return {name: float(getattr(self, name).detach()) for name in self._physical_names}

    def extra_repr(self) -> str:
        values = ", ".join(f"{k}={v:.4g}" for k, v in self.physical_parameters().items())
        return f"{values}, dt={self.dt}, integrator={self.integrator!r}"


class Pendulum(_PhysicalSystem):
    """Torque-driven damped pendulum ``m l² θ̈ = m g l sin θ − b θ̇ + τ`` (``θ = 0`` upright).

    Args:
        dt: integration step in seconds.
        mass: point mass ``m`` (kg), > 0.
        length: rod length ``l`` (m), > 0.
        gravity: ``g`` (m/s²), > 0.
        damping: viscous damping ``b`` (N·m·s), >= 0.
        integrator: ``"rk4"`` or ``"semi_implicit_euler"``.
        learnable: names of the parameters to expose as ``nn.Parameter`` (e.g. ``("mass",)``);
            the rest are buffers.

    Call: ``pendulum(x (B, 2), u (B, 1)) -> x_next (B, 2)``. Parameters are cast to the dtype
    of ``x`` inside the call, so float32 and float64 inputs both work.
    """

    n_state = 2
    n_ctrl = 1
    _physical_names = ("mass", "length", "gravity", "damping")

    def __init__(
        self,
        dt: float = 0.05,
        mass: float = 1.0,
        length: float = 1.0,
        gravity: float = 9.81,
        damping: float = 0.0,
        integrator: Integrator = "rk4",
        learnable: Sequence[str] = (),
    ) -> None:
        super().__init__()
        self._set_integration(dt, integrator)
        self._register_physical(
            {"mass": mass, "length": length, "gravity": gravity, "damping": damping},
            learnable,
            nonnegative=("damping",),
        )

    def derivative(self, x: Tensor, u: Tensor) -> Tensor:
        """Continuous-time ``ẋ = (ω, θ̈)``; ``x (B, 2)``, ``u (B, 1)`` -> ``(B, 2)``."""
        m, ell, g, b = (getattr(self, k).to(x.dtype) for k in self._physical_names)
        theta, omega = x[..., 0], x[..., 1]
        inertia = m * ell * ell
        # θ̈ = (m g l sin θ − b ω + τ) / (m l²)
        alpha = (m * g * ell * torch.sin(theta) - b * omega + u[..., 0]) / inertia
        return torch.stack([omega, alpha], dim=-1)

    def forward(self, x: Tensor, u: Tensor) -> Tensor:
        """One step: ``x (B, 2)``, ``u (B, 1)`` -> ``x_next (B, 2)``."""
        _check_step_inputs(x, u, self.n_state, self.n_ctrl)
        return integrate(self.derivative, x, u, self.dt, self.integrator)

    def energy(self, x: Tensor) -> Tensor:
        """Mechanical energy ``½ m l² ω² + m g l cos θ`` of states ``x (..., 2)`` -> ``(...)``."""
        m, ell, g = (getattr(self, k).to(x.dtype) for k in ("mass", "length", "gravity"))
        return 0.5 * m * ell * ell * x[..., 1] ** 2 + m * g * ell * torch.cos(x[..., 0])

    def rollout(self, x0: Tensor, u: Tensor) -> Tensor:
        """Open-loop rollout: ``x0 (B, 2)``, ``u (B, T, 1)`` -> ``x (B, T+1, 2)``."""
        return rollout(self, x0, u)


def rollout(dynamics: nn.Module, x0: Tensor, u: Tensor) -> Tensor:
    """Roll ``dynamics (x, u) -> x_next`` forward: ``x0 (B, n)``, ``u (B, T, m)`` ->
    ``x (B, T+1, n)`` with ``x[:, 0] = x0``."""
    if u.dim() != 3 or u.shape[0] != x0.shape[0]:
        raise ValueError(f"u must have shape (B={x0.shape[0]}, T, m), got {tuple(u.shape)}")
    xs = [x0]
    for t in range(u.shape[1]):
        xs.append(dynamics(xs[-1], u[:, t]))
    return torch.stack(xs, dim=1)
