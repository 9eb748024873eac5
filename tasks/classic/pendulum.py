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

Analytic Jacobians. :meth:`Pendulum.jacobians` returns ``A = ∂x_next/∂x`` and
``B = ∂x_next/∂u`` of one integrator step in closed form: the Jacobians ``f_x``, ``f_u`` of the
continuous dynamics are written out by hand and chained through the integrator's stages
(:func:`integrate_jacobians`). They are plain torch expressions of ``x``, ``u`` and the physical
parameters, so autograd differentiates them again: the gradient of ``λᵀA`` w.r.t. ``x`` is the
dynamics curvature a Newton-type solver (or the exact MPC backward) needs, and gradients reach
the learnable parameters through ``A`` and ``B`` as well. :class:`diffto.layers.MPC` uses
``jacobians`` instead of ``torch.func`` whenever a dynamics module defines it.

This file also holds :func:`integrate` and :func:`integrate_jacobians`, the one-step
integrator and its derivative, shared by the classic systems.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

__all__ = ["Pendulum", "integrate", "integrate_jacobians", "rollout", "Integrator"]

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


def integrate_jacobians(
    derivative_jacobians: Callable[[Tensor, Tensor], tuple[Tensor, Tensor, Tensor]],
    x: Tensor,
    u: Tensor,
    dt: float,
    integrator: Integrator = "rk4",
) -> tuple[Tensor, Tensor, Tensor]:
    """One step of :func:`integrate` and its Jacobians, chained analytically through the stages.

    Args:
        derivative_jacobians: ``(x (B, n), u (B, m)) -> (ẋ (B, n), f_x (B, n, n), f_u (B, n, m))``,
            the continuous dynamics and their Jacobians.
        x: ``(B, n)`` state (``[q; q̇]`` for ``"semi_implicit_euler"``).
        u: ``(B, m)`` control.
        dt: step length.
        integrator: ``"rk4"`` or ``"semi_implicit_euler"``, as in :func:`integrate`.

    Returns:
        ``x_next (B, n)``, ``A = ∂x_next/∂x (B, n, n)``, ``B = ∂x_next/∂u (B, n, m)``; equal to
        autograd's Jacobians of :func:`integrate` to rounding, and differentiable again.
    """
    n = x.shape[-1]
    eye = torch.eye(n, dtype=x.dtype, device=x.device)
    if integrator == "rk4":
        # Stage i evaluates k_i = f(y_i, u) at y_1 = x, y_2 = x + h/2 k_1, y_3 = x + h/2 k_2,
        # y_4 = x + h k_3. By the chain rule, with F_i = f_x(y_i), G_i = f_u(y_i):
        #   ∂k_i/∂x = F_i (I + c_i ∂k_{i-1}/∂x),   ∂k_i/∂u = F_i c_i ∂k_{i-1}/∂u + G_i,
        # c = (0, h/2, h/2, h), and x_next = x + h/6 (k_1 + 2 k_2 + 2 k_3 + k_4) gives
        #   A = I + h/6 Σ w_i ∂k_i/∂x,   B = h/6 Σ w_i ∂k_i/∂u,   w = (1, 2, 2, 1).
        k, K_x, K_u = derivative_jacobians(x, u)
        k_sum, A_sum, B_sum = k, K_x, K_u
        for c, w in ((0.5 * dt, 2.0), (0.5 * dt, 2.0), (dt, 1.0)):
            k, F, G = derivative_jacobians(x + c * k, u)
            K_x = F + c * (F @ K_x)  # F (I + c K_x)
            K_u = c * (F @ K_u) + G
            k_sum = k_sum + w * k
            A_sum = A_sum + w * K_x
            B_sum = B_sum + w * K_u
        h6 = dt / 6.0
        return x + h6 * k_sum, eye + h6 * A_sum, h6 * B_sum
    if integrator == "semi_implicit_euler":
        # v' = v + h a(x, u), q' = q + h v'  with a the lower half of f:
        #   ∂v'/∂x = [0 I] + h a_x,  ∂v'/∂u = h a_u,  ∂q'/∂(x, u) = [I 0 | 0] + h ∂v'/∂(x, u).
        half = n // 2
        f, f_x, f_u = derivative_jacobians(x, u)
        v_next = x[..., half:] + dt * f[..., half:]
        V_x = eye[half:] + dt * f_x[..., half:, :]  # (B, n/2, n)
        V_u = dt * f_u[..., half:, :]  # (B, n/2, m)
        x_next = torch.cat([x[..., :half] + dt * v_next, v_next], dim=-1)
        A = torch.cat([eye[:half] + dt * V_x, V_x], dim=-2)
        B = torch.cat([dt * V_u, V_u], dim=-2)
        return x_next, A, B
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
    ``pendulum.jacobians(x, u) -> (A (B, 2, 2), B (B, 2, 1))`` gives the analytic Jacobians of
    that step (see the module docstring); the solver layers use them instead of autograd.
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

    def derivative_jacobians(self, x: Tensor, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``ẋ (B, 2)``, ``f_x = ∂ẋ/∂x (B, 2, 2)``, ``f_u = ∂ẋ/∂u (B, 2, 1)`` at ``x (B, 2)``,
        ``u (B, 1)``."""
        m, ell, g, b = (getattr(self, k).to(x.dtype) for k in self._physical_names)
        theta, omega = x[..., 0], x[..., 1]
        inertia = m * ell * ell
        sin, cos = torch.sin(theta), torch.cos(theta)
        alpha = (m * g * ell * sin - b * omega + u[..., 0]) / inertia
        zero, one = torch.zeros_like(theta), torch.ones_like(theta)
        # ∂θ̈/∂θ = g cos θ / l,  ∂θ̈/∂ω = −b / (m l²),  ∂θ̈/∂τ = 1 / (m l²)
        f_x = torch.stack(
            [torch.stack([zero, one], -1),
             torch.stack([g * cos / ell, (-b / inertia) * one], -1)],
            dim=-2,
        )
        f_u = torch.stack([zero, one / inertia], -1).unsqueeze(-1)
        return torch.stack([omega, alpha], dim=-1), f_x, f_u

    def forward(self, x: Tensor, u: Tensor) -> Tensor:
        """One step: ``x (B, 2)``, ``u (B, 1)`` -> ``x_next (B, 2)``."""
        _check_step_inputs(x, u, self.n_state, self.n_ctrl)
        return integrate(self.derivative, x, u, self.dt, self.integrator)

    def jacobians(self, x: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
        """Analytic Jacobians of one step: ``x (B, 2)``, ``u (B, 1)`` ->
        ``A = ∂x_next/∂x (B, 2, 2)``, ``B = ∂x_next/∂u (B, 2, 1)``, differentiable w.r.t. ``x``,
        ``u`` and the learnable parameters."""
        _check_step_inputs(x, u, self.n_state, self.n_ctrl)
        _, A, B = integrate_jacobians(self.derivative_jacobians, x, u, self.dt, self.integrator)
        return A, B

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
