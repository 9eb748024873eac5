"""A cart-pole (inverted pendulum on a cart) as a differentiable discrete-time dynamics module.

State ``x = (p, θ, ṗ, θ̇)``: cart position ``p``, pole angle ``θ`` from upright (``θ = 0``
upright, positive when the pole tips towards ``+p``), and their rates. Control ``u = (F,)``
is a horizontal force on the cart. The pole is a point mass ``m_p`` at distance ``l`` from
the pivot, the cart has mass ``m_c``; ``μ`` is viscous friction on the cart.

Derivation (Lagrangian). With the pole mass at ``(p + l sin θ, l cos θ)``,

.. math::

    T = ½ (m_c + m_p) ṗ² + m_p l \\cos θ\\, ṗ θ̇ + ½ m_p l² θ̇²,  \\qquad V = m_p g l \\cos θ,

and the Euler-Lagrange equations are

.. math::

    (m_c + m_p) \\ddot p + m_p l \\cos θ\\, \\ddot θ - m_p l \\sin θ\\, θ̇² = F - μ ṗ, \\\\
    l \\ddot θ = g \\sin θ - \\cos θ\\, \\ddot p .

Eliminating ``θ̈``:

.. math::

    \\ddot p = \\frac{F - μ ṗ + m_p \\sin θ (l θ̇² - g \\cos θ)}{m_c + m_p \\sin² θ}, \\qquad
    \\ddot θ = \\frac{g \\sin θ - \\cos θ\\, \\ddot p}{l}.

With ``F = 0`` and ``μ = 0`` the energy ``T + V`` is conserved, which the tests check.

Jacobians of the accelerations (``D = m_c + m_p \\sin² θ``, ``s = \\sin θ``, ``c = \\cos θ``):

.. math::

    ∂\\ddot p/∂θ = \\frac{m_p (l θ̇² c - g (c² - s²)) - 2 m_p s c\\, \\ddot p}{D},\\quad
    ∂\\ddot p/∂ṗ = -μ/D,\\quad ∂\\ddot p/∂θ̇ = 2 m_p l s θ̇ / D,\\quad ∂\\ddot p/∂F = 1/D, \\\\
    ∂\\ddot θ/∂θ = (g c + s \\ddot p - c\\, ∂\\ddot p/∂θ) / l,\\qquad
    ∂\\ddot θ/∂(ṗ, θ̇, F) = -c\\, ∂\\ddot p/∂(ṗ, θ̇, F) / l;

:meth:`CartPole.jacobians` chains them through the integrator's stages
(:func:`~diffto.tasks.classic.pendulum.integrate_jacobians`). The result is a plain torch
expression, differentiable again w.r.t. the state, the control and the learnable parameters.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from diffto.tasks.classic.pendulum import (
    Integrator,
    _check_step_inputs,
    _PhysicalSystem,
    integrate,
    integrate_jacobians,
    rollout,
)

__all__ = ["CartPole"]


class CartPole(_PhysicalSystem):
    """Cart-pole with a point-mass pole; ``θ = 0`` is upright.

    Args:
        dt: integration step in seconds.
        cart_mass: ``m_c`` (kg), > 0.
        pole_mass: ``m_p`` (kg), > 0.
        pole_length: ``l`` (m), distance from the pivot to the pole's mass, > 0.
        gravity: ``g`` (m/s²), > 0.
        friction: viscous friction ``μ`` on the cart (N·s/m), >= 0.
        integrator: ``"rk4"`` or ``"semi_implicit_euler"``.
        learnable: names of the parameters exposed as ``nn.Parameter``; the rest are buffers.

    Call: ``cartpole(x (B, 4), u (B, 1)) -> x_next (B, 4)``;
    ``cartpole.jacobians(x, u) -> (A (B, 4, 4), B (B, 4, 1))`` gives the analytic Jacobians of
    that step (see the module docstring); the solver layers use them instead of autograd.
    """

    n_state = 4
    n_ctrl = 1
    _physical_names = ("cart_mass", "pole_mass", "pole_length", "gravity", "friction")

    def __init__(
        self,
        dt: float = 0.05,
        cart_mass: float = 1.0,
        pole_mass: float = 0.1,
        pole_length: float = 0.5,
        gravity: float = 9.81,
        friction: float = 0.0,
        integrator: Integrator = "rk4",
        learnable: Sequence[str] = (),
    ) -> None:
        super().__init__()
        self._set_integration(dt, integrator)
        self._register_physical(
            {
                "cart_mass": cart_mass,
                "pole_mass": pole_mass,
                "pole_length": pole_length,
                "gravity": gravity,
                "friction": friction,
            },
            learnable,
            nonnegative=("friction",),
        )

    def derivative(self, x: Tensor, u: Tensor) -> Tensor:
        """Continuous-time ``ẋ = (ṗ, θ̇, p̈, θ̈)``; ``x (B, 4)``, ``u (B, 1)`` -> ``(B, 4)``."""
        mc, mp, ell, g, mu = (getattr(self, k).to(x.dtype) for k in self._physical_names)
        theta, p_dot, theta_dot = x[..., 1], x[..., 2], x[..., 3]
        sin, cos = torch.sin(theta), torch.cos(theta)
        force = u[..., 0] - mu * p_dot
        # p̈ = (F − μṗ + m_p sin θ (l θ̇² − g cos θ)) / (m_c + m_p sin² θ)
        p_ddot = (force + mp * sin * (ell * theta_dot**2 - g * cos)) / (mc + mp * sin**2)
        # θ̈ = (g sin θ − cos θ p̈) / l
        theta_ddot = (g * sin - cos * p_ddot) / ell
        return torch.stack([p_dot, theta_dot, p_ddot, theta_ddot], dim=-1)

    def derivative_jacobians(self, x: Tensor, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``ẋ (B, 4)``, ``f_x = ∂ẋ/∂x (B, 4, 4)``, ``f_u = ∂ẋ/∂u (B, 4, 1)`` at ``x (B, 4)``,
        ``u (B, 1)``; the formulas are in the module docstring."""
        mc, mp, ell, g, mu = (getattr(self, k).to(x.dtype) for k in self._physical_names)
        theta, p_dot, theta_dot = x[..., 1], x[..., 2], x[..., 3]
        sin, cos = torch.sin(theta), torch.cos(theta)
        denom = mc + mp * sin**2
        p_ddot = (u[..., 0] - mu * p_dot + mp * sin * (ell * theta_dot**2 - g * cos)) / denom
        theta_ddot = (g * sin - cos * p_ddot) / ell
        # p̈ = N / D: ∂p̈ = (∂N − p̈ ∂D) / D with ∂N/∂θ = m_p (l θ̇² c − g (c² − s²)),
        # ∂D/∂θ = 2 m_p s c; ṗ, θ̇ and F enter N only.
        pdd_theta = (mp * (ell * theta_dot**2 * cos - g * (cos**2 - sin**2))
                     - 2.0 * mp * sin * cos * p_ddot) / denom
        pdd_pdot = -mu / denom
        pdd_thetadot = 2.0 * mp * ell * sin * theta_dot / denom
        pdd_force = 1.0 / denom
        # θ̈ = (g s − c p̈) / l
        tdd_theta = (g * cos + sin * p_ddot - cos * pdd_theta) / ell
        zero, one = torch.zeros_like(theta), torch.ones_like(theta)
        f_x = torch.stack(
            [torch.stack([zero, zero, one, zero], -1),
             torch.stack([zero, zero, zero, one], -1),
             torch.stack([zero, pdd_theta, pdd_pdot, pdd_thetadot], -1),
             torch.stack([zero, tdd_theta, -cos * pdd_pdot / ell, -cos * pdd_thetadot / ell],
                         -1)],
            dim=-2,
        )
        f_u = torch.stack([zero, zero, pdd_force, -cos * pdd_force / ell], -1).unsqueeze(-1)
        f = torch.stack([p_dot, theta_dot, p_ddot, theta_ddot], dim=-1)
        return f, f_x, f_u

    def forward(self, x: Tensor, u: Tensor) -> Tensor:
        """One step: ``x (B, 4)``, ``u (B, 1)`` -> ``x_next (B, 4)``."""
        _check_step_inputs(x, u, self.n_state, self.n_ctrl)
        return integrate(self.derivative, x, u, self.dt, self.integrator)

    def jacobians(self, x: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
        """Analytic Jacobians of one step: ``x (B, 4)``, ``u (B, 1)`` ->
        ``A = ∂x_next/∂x (B, 4, 4)``, ``B = ∂x_next/∂u (B, 4, 1)``, differentiable w.r.t. ``x``,
        ``u`` and the learnable parameters."""
        _check_step_inputs(x, u, self.n_state, self.n_ctrl)
        _, A, B = integrate_jacobians(self.derivative_jacobians, x, u, self.dt, self.integrator)
        return A, B

    def energy(self, x: Tensor) -> Tensor:
        """Mechanical energy ``T + V`` of states ``x (..., 4)`` -> ``(...)``."""
        names = ("cart_mass", "pole_mass", "pole_length", "gravity")
        mc, mp, ell, g = (getattr(self, k).to(x.dtype) for k in names)
        theta, p_dot, theta_dot = x[..., 1], x[..., 2], x[..., 3]
        kinetic = (
            0.5 * (mc + mp) * p_dot**2
            + mp * ell * torch.cos(theta) * p_dot * theta_dot
            + 0.5 * mp * ell * ell * theta_dot**2
        )
        return kinetic + mp * g * ell * torch.cos(theta)

    def rollout(self, x0: Tensor, u: Tensor) -> Tensor:
        """Open-loop rollout: ``x0 (B, 4)``, ``u (B, T, 1)`` -> ``x (B, T+1, 4)``."""
        return rollout(self, x0, u)
