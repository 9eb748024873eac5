"""Trajectory optimization as Theseus nonlinear least squares, differentiable.

For each batch row, with ``τ_t = [x_t; u_t]`` and ``x_{t+1} = φ(x_t, u_t)``,

.. math::

    \\min_{u_{0:T-1}} J(u) = \\sum_{t<T} \\tfrac12 \\tau_t^\\top C_t \\tau_t + c_t^\\top \\tau_t
        + \\tfrac12 x_T^\\top C_f x_T + c_f^\\top x_T .

**Shooting, not penalties.** The controls ``U = [u_0..u_{T-1}] (B, T·m)`` are Theseus's only
optimization variable and the states come from rolling ``φ`` out from ``x0``, so every plan
satisfies the dynamics exactly (a soft dynamics penalty of weight ``w`` leaves defects of
order ``1/w`` and couples the plan's accuracy to the conditioning). The price is a dense
``(T·m)²`` normal matrix per row, which is small at the horizons these layers serve. The
residual Jacobian ``∂r/∂U`` is formed from per-stage dynamics Jacobians by forward
sensitivities of the rollout (:meth:`ShootingProblem.residual_jacobian`), about 4x faster here than
Theseus's generic ``AutoDiffCostFunction`` (still available through ``autograd_mode``).

**Cost as residuals.** With ``C_t = L_t L_tᵀ`` (Cholesky) the stage cost is
``½‖L_tᵀ τ_t + L_t⁻¹ c_t‖² − ½‖L_t⁻¹ c_t‖²``; the constant does not move the optimum, so
Theseus minimizes the sum of these squared residuals (and the terminal one). This needs every
``C_t`` (and ``C_f``) positive definite; a PSD cost (say, a position-only state weight) can be
used with ``cost_regularization = ε > 0``, which solves the problem with ``C + εI`` instead
(the plan moves by ``O(ε)``; the backward pass differentiates the same regularized problem).

**General costs.** A :class:`~diffto.LeastSquaresCost` is what Theseus solves natively: its
stage residuals ``r(x_t, u_t) (B, T, r)`` and terminal residual become the error vector, and
their Jacobians ``∂r_t/∂τ_t`` (by autograd, per stage) enter the same forward sensitivities.
A :class:`~diffto.NonlinearCost` is refused with a ``ValueError``: Theseus minimizes sums of
squared residuals, and a general ``ℓ`` offers none. The generic one, ``√(2ℓ)``, needs
``ℓ ≥ 0``, is not differentiable where ``ℓ = 0`` (at the goal, where a tracking cost ends) and
makes Gauss-Newton stall there; its Jacobian also carries none of ``ℓ``'s curvature. A cost that
is a sum of squares should say so as a ``LeastSquaresCost``; any other cost goes to ``MPC`` or
``CasadiTO``, which use its exact Hessians.

**Backward modes** (``backward=``, a string so YAML configs can set it):

* ``"implicit"`` (default): diffto's exact implicit differentiation of the stationarity
  condition ``∇_U J = 0`` with the full Hessian (see :class:`ImplicitShooting`). Exact for
  nonlinear dynamics and w.r.t. every tensor the problem uses: ``x0``, the cost's tensors, a
  general cost's parameters and closed-over tensors, ``F``, and a dynamics module's parameters
  and the tensors it closes over. Only ``"implicit"`` and ``"unroll"`` take general costs.
* ``"theseus_implicit"``: Theseus's own implicit mode, one Gauss-Newton step at the solution
  with the Hessian detached. It uses ``JᵀJ`` in place of the full Hessian, dropping
  ``Σ r_i ∇²r_i``: exact when the residuals are linear in ``U`` (linear dynamics) or vanish at
  the optimum, biased otherwise; on the pendulum swing-up of ``tests/layers/test_theseus.py``
  its gradients were off by 3-40 % while ``"implicit"`` matched central differences to
  1e-5. Kept for comparison with Theseus users' results.
* ``"unroll"``: backpropagate through every optimizer iteration (memory ∝ iterations).
* ``"truncated"``: backpropagate through the last ``backward_num_iterations`` iterations.
* ``"dlm"``: Theseus's direct loss minimization (a finite-difference-like estimate with
  ``dlm_epsilon``); approximate, and it reaches only ``x0`` and the cost tensors.

Per-row convergence: Theseus's status must be ``CONVERGED`` *and* the row must be stationary,
``‖∇_U J‖_∞ ≤ grad_tol·(1 + |J|)`` (Theseus declares convergence when the error stops
decreasing, which a stalled row also does).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from diffto.costs import LeastSquaresCost, NonlinearCost
from diffto.layers._theseus_shooting import ImplicitShooting, ShootingProblem, shooting_cost_class
from diffto.problem import LinearDynamics, QuadraticCost, Solution, check_x0, problem_dims

__all__ = ["TheseusTO", "BackwardMode"]

BackwardMode = Literal["implicit", "theseus_implicit", "truncated", "unroll", "dlm"]
_THESEUS_MODES = {
    "theseus_implicit": "IMPLICIT",
    "truncated": "TRUNCATED",
    "unroll": "UNROLL",
    "dlm": "DLM",
}


def _theseus():
    """Import Theseus lazily: it is an optional dependency (``pip install diffto[theseus]``)."""
    try:
        import theseus
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "TheseusTO needs theseus-ai: pip install --no-build-isolation theseus-ai"
        ) from err
    return theseus


def _factor(name: str, C: Tensor, reg: float) -> Tensor:
    """Lower Cholesky factor of ``C + reg·I`` (``(..., k, k)``); ValueError if not PD."""
    k = C.shape[-1]
    C = C + reg * torch.eye(k, dtype=C.dtype, device=C.device)
    L, info = torch.linalg.cholesky_ex(C)
    if (info != 0).any():
        lam = torch.linalg.eigvalsh(C.detach().double())[..., 0].min().item()
        raise ValueError(
            f"{name} must be positive definite for TheseusTO's least-squares form (smallest "
            f"eigenvalue {lam:.3g}); pass cost_regularization > 0 to solve with {name} + εI"
        )
    return L


class TheseusTO(nn.Module):
    """Trajectory optimization solved by Theseus (Gauss-Newton or Levenberg-Marquardt).

    Args:
        dynamics: an ``nn.Module`` (or function) ``(x (B, n), u (B, m)) -> x_next (B, n)``,
            or a :class:`~diffto.problem.LinearDynamics` (its ``F``, ``f`` get gradients), or
            ``None`` when every call passes its dynamics (a call's dynamics wins). With
            ``backward="implicit"`` gradients reach a module's parameters and every tensor it
            closes over; in Theseus's own modes, a module's parameters (and closed-over tensors
            only in ``unroll``/``truncated``).
        horizon: T.
        optimizer: ``"gauss_newton"`` or ``"levenberg_marquardt"``.
        backward: ``"implicit"`` | ``"theseus_implicit"`` | ``"truncated"`` | ``"unroll"`` |
            ``"dlm"``; see the module docstring.
        max_iter: optimizer iteration cap.
        abs_err_tolerance, rel_err_tolerance: Theseus's stopping tests on the error decrease.
        grad_tol: stationarity test for ``converged`` (see the module docstring); ``None``
            means 1e-6 in float64 and 1e-4 in lower precision.
        step_size: optimizer step size.
        damping: Levenberg-Marquardt damping.
        cost_regularization: ``ε ≥ 0`` added to every ``C_t`` and ``C_f`` diagonal.
        backward_num_iterations: iterations differentiated in ``"truncated"`` mode.
        dlm_epsilon: perturbation size of ``"dlm"``.
        autograd_mode: how the residual Jacobians are formed: ``"analytic"`` (forward
            sensitivities of the rollout from per-stage dynamics Jacobians, one vmapped
            ``jacrev`` of the dynamics; the fastest, and the only mode for a
            ``LeastSquaresCost``) or Theseus's ``AutoDiffCostFunction`` modes ``"vmap"``,
            ``"loop_batch"``, ``"dense"``. ``"analytic"`` and ``"vmap"`` need a
            vmap-compatible dynamics module.

    Call as ``layer(x0, cost, dynamics=None, u_init=None) -> Solution`` with ``x0 (B, n)``, a
    :class:`~diffto.problem.QuadraticCost` of horizon T (``C_final`` required if ``c_final``
    is given) or a :class:`~diffto.LeastSquaresCost`, the dynamics for this call (``None``:
    the constructor's) and ``u_init (B, T, m)`` (zeros if ``None``; with a least-squares cost
    and a dynamics module that does not reveal ``m`` through a ``u_lower`` attribute, pass
    it). ``Solution.extras``: ``costates (B, T+1, n)`` (``λ_t = ∂J/∂x_t`` along the rollout,
    MPC's sign convention), ``status`` (Theseus status name per row), ``residual (B,)``
    (``‖∇_U J‖_∞`` at the plan), ``error (B,)`` (Theseus's final error); none carries
    gradients. A row whose plan is not finite (the dynamics returned NaN, say) is flagged, its
    cost is NaN, and with ``backward="implicit"`` it contributes zero gradient, to its own
    inputs and to tensors the rows share.

    Example::

        >>> import torch
        >>> from diffto import LinearDynamics, QuadraticCost
        >>> from diffto.layers import TheseusTO
        >>> A = torch.tensor([[1.0, 0.1], [0.0, 1.0]])
        >>> dyn = LinearDynamics.time_invariant(A, torch.tensor([[0.0], [0.1]]), horizon=10)
        >>> cost = QuadraticCost.tracking(torch.ones(2), 0.1 * torch.ones(1), horizon=10)
        >>> sol = TheseusTO(dyn, 10)(torch.randn(4, 2), cost)
        >>> sol.u.shape, bool(sol.converged.all())
        (torch.Size([4, 10, 1]), True)
    """

    def __init__(
        self,
        dynamics: Any,
        horizon: int,
        optimizer: Literal["gauss_newton", "levenberg_marquardt"] = "gauss_newton",
        backward: BackwardMode = "implicit",
        max_iter: int = 50,
        abs_err_tolerance: float = 1e-12,
        rel_err_tolerance: float = 1e-12,
        grad_tol: float | None = None,
        step_size: float = 1.0,
        damping: float = 1e-3,
        cost_regularization: float = 0.0,
        backward_num_iterations: int = 5,
        dlm_epsilon: float = 1e-2,
        autograd_mode: Literal["analytic", "vmap", "loop_batch", "dense"] = "analytic",
    ) -> None:
        super().__init__()
        if horizon < 1:
            raise ValueError(f"horizon must be >= 1, got {horizon}")
        if dynamics is not None:
            self._check_dynamics(dynamics, horizon)
        if optimizer not in ("gauss_newton", "levenberg_marquardt"):
            raise ValueError(
                f"optimizer must be 'gauss_newton' or 'levenberg_marquardt', got {optimizer!r}"
            )
        if backward != "implicit" and backward not in _THESEUS_MODES:
            raise ValueError(
                f"backward must be one of implicit, {', '.join(_THESEUS_MODES)}; got {backward!r}"
            )
        for name, val in (
            ("max_iter", max_iter),
            ("backward_num_iterations", backward_num_iterations),
        ):
            if val < 1:
                raise ValueError(f"{name} must be >= 1, got {val}")
        if cost_regularization < 0:
            raise ValueError(f"cost_regularization must be >= 0, got {cost_regularization}")
        if grad_tol is not None and not grad_tol > 0:
            raise ValueError(f"grad_tol must be > 0, got {grad_tol}")
        if autograd_mode not in ("analytic", "vmap", "loop_batch", "dense"):
            raise ValueError(
                f"autograd_mode must be analytic, vmap, loop_batch or dense; got {autograd_mode!r}"
            )
        self.dynamics = dynamics
        self.horizon = horizon
        self.optimizer, self.backward = optimizer, backward
        self.max_iter, self.grad_tol = max_iter, grad_tol
        self.abs_err_tolerance, self.rel_err_tolerance = abs_err_tolerance, rel_err_tolerance
        self.step_size, self.damping = step_size, damping
        self.cost_regularization = cost_regularization
        self.backward_num_iterations, self.dlm_epsilon = backward_num_iterations, dlm_epsilon
        self.autograd_mode = autograd_mode

    @staticmethod
    def _check_dynamics(dynamics: Any, horizon: int) -> None:
        if not (isinstance(dynamics, LinearDynamics) or callable(dynamics)):
            raise ValueError(
                f"dynamics must be an nn.Module/function (x, u) -> x_next or a LinearDynamics, "
                f"got {type(dynamics).__name__}"
            )
        if isinstance(dynamics, LinearDynamics) and dynamics.horizon != horizon:
            raise ValueError(f"dynamics.F has horizon {dynamics.horizon}, expected {horizon}")

    def _dims(self, x0: Tensor, cost: Any, dyn: Any, u_init: Tensor | None):
        """``(B, T, n, m)`` of a call; for a least-squares cost ``m`` comes from the dynamics
        (``LinearDynamics``, a ``u_lower`` attribute of shape ``(m,)``) or ``u_init``."""
        n_known = dyn.n_state if isinstance(dyn, LinearDynamics) else None
        if isinstance(cost, QuadraticCost):
            B, T, n, m = problem_dims(x0, cost, n_known)
            if T != self.horizon:
                raise ValueError(
                    f"cost has horizon {T} but the layer was built for {self.horizon}"
                )
            return B, T, n, m
        if isinstance(cost, LeastSquaresCost):
            horizon = getattr(cost, "horizon", None)
            if horizon is not None and horizon != self.horizon:
                raise ValueError(
                    f"cost has horizon {horizon} but the layer was built for {self.horizon}"
                )
            x0 = check_x0(x0, n_known)
            if isinstance(dyn, LinearDynamics):
                m = dyn.n_ctrl
            elif isinstance(u_init, Tensor) and u_init.dim() >= 2:
                m = u_init.shape[-1]
            elif isinstance(getattr(dyn, "u_lower", None), Tensor):
                m = dyn.u_lower.shape[-1]
            else:
                raise ValueError(
                    "u_init (B, T, m) is required with a LeastSquaresCost when the dynamics "
                    "does not give m (a LinearDynamics, or a u_lower attribute of shape (m,))"
                )
            return x0.shape[0], self.horizon, x0.shape[-1], m
        if isinstance(cost, NonlinearCost):
            raise ValueError(
                "TheseusTO minimizes sums of squared residuals and a NonlinearCost has none: "
                "write the cost as a LeastSquaresCost (ℓ = ½‖r‖²), or use MPC or CasadiTO, "
                "which take any NonlinearCost"
            )
        raise ValueError(
            f"cost must be a QuadraticCost or a LeastSquaresCost, got {type(cost).__name__}"
        )

    def _theta(self, x0: Tensor, cost: Any, dyn: Any,
               problem: ShootingProblem) -> tuple[Tensor, ...]:
        """Gather ``theta`` (see :class:`ShootingProblem`), batch-expanded, of a checked call."""
        B, T, n, m = problem.B, problem.T, problem.n, problem.m
        k = n + m
        x0 = x0.reshape(-1, n)
        theta = [x0]
        if problem.quadratic:
            if cost.C_final is None and cost.c_final is not None:
                raise ValueError(
                    "cost.C_final is required when cost.c_final is given (least squares)"
                )
            C, c, C_f, c_f = cost.batched(n, m)
            eps = self.cost_regularization
            eye = torch.eye(k, dtype=C.dtype, device=C.device)
            C = (C + eps * eye).expand(B, -1, -1, -1)
            c = (x0.new_zeros(1, T, k) if c is None else c).expand(B, -1, -1)
            C_f = x0.new_zeros(1, n, n) if C_f is None else C_f + eps * eye[:n, :n]
            c_f = (x0.new_zeros(1, n) if c_f is None else c_f).expand(B, -1)
            theta += [C, c, C_f.expand(B, -1, -1), c_f]
        if isinstance(dyn, LinearDynamics):
            if (dyn.n_state, dyn.n_ctrl) != (n, m):
                raise ValueError(
                    f"dynamics.F has shape {tuple(dyn.F.shape)}, expected (B, {T}, {n}, {k})"
                )
            F, f = dyn.batched()
            if F.shape[0] not in (1, B):
                raise ValueError(f"dynamics.F has batch {F.shape[0]} but x0 has batch {B}")
            f = x0.new_zeros(1, T, n) if f is None else f
            theta += [F.expand(B, -1, -1, -1), f.expand(B, -1, -1)]
        elif isinstance(dyn, nn.Module):
            named = list(dyn.named_parameters())
            problem.param_names = [name for name, _ in named]
            theta += [p for _, p in named]
        return tuple(theta)

    def forward(
        self, x0: Tensor, cost: Any, dynamics: Any = None, u_init: Tensor | None = None
    ) -> Solution:
        """Solve the batch; see the class docstring for shapes."""
        th = _theseus()
        dyn = self.dynamics if dynamics is None else dynamics
        if dyn is None:
            raise ValueError("dynamics must be given, at construction or in the call")
        self._check_dynamics(dyn, self.horizon)
        B, T, n, m = self._dims(x0, cost, dyn, u_init)
        problem = ShootingProblem(dyn, cost, T, n, m)
        problem.B = B
        if not problem.quadratic:
            if self.backward not in ("implicit", "unroll"):
                raise ValueError(
                    f"backward={self.backward!r} does not take a LeastSquaresCost: use "
                    "'implicit' or 'unroll'"
                )
            if self.autograd_mode != "analytic":
                raise ValueError("a LeastSquaresCost needs autograd_mode='analytic'")
        theta = self._theta(x0, cost, dyn, problem)
        dtype = theta[0].dtype
        if u_init is None:
            U0 = theta[0].new_zeros(B, T * m)
        else:
            if not isinstance(u_init, Tensor) or tuple(u_init.shape[-2:]) != (T, m):
                shape = tuple(u_init.shape) if isinstance(u_init, Tensor) else type(u_init)
                raise ValueError(f"u_init must have shape (B, {T}, {m}), got {shape}")
            if not torch.isfinite(u_init).all():
                raise ValueError("u_init contains NaN/Inf entries")
            U0 = u_init.reshape(-1, T * m).expand(B, -1).to(dtype)

        implicit = self.backward == "implicit"
        grad_on = torch.is_grad_enabled() and not implicit
        with torch.set_grad_enabled(grad_on):
            src = theta if grad_on else tuple(t.detach() for t in theta)
            factors = self._factors(cost, src) if problem.quadratic else ()
            with torch.no_grad():
                problem.res_dim = problem.residuals(U0.detach(), src, factors).shape[-1]
            U_sol, info = self._solve(th, problem, src, factors, U0)
        x = None
        if implicit:
            U_sol = U_sol.detach()
            if torch.is_grad_enabled():
                U_sol, x = self._implicit(problem, theta, U_sol)
        u = U_sol.reshape(B, T, m)
        x = problem.rollout(U_sol, theta) if x is None else x
        keep = torch.isfinite(x).flatten(1).all(-1) & torch.isfinite(u).flatten(1).all(-1)
        with torch.enable_grad():
            # ∇_U J (stationarity) and the costates λ_t = ∂J/∂x_t, one reverse pass.
            Ud = U_sol.detach().requires_grad_(True)
            eps = x.new_zeros(B, T + 1, n, requires_grad=True)
            J = problem.objective(Ud, tuple(t.detach() for t in theta), False, eps)
            G, costates = torch.autograd.grad(J.sum(), (Ud, eps))
        grad_norm = G.abs().amax(-1)
        status = [s.name for s in info.status]
        ok = torch.tensor([s == "CONVERGED" for s in status], device=x.device)
        tol = self.grad_tol or (1e-6 if x.dtype == torch.float64 else 1e-4)
        converged = ok & keep & (grad_norm <= tol * (1 + J.detach().abs()))
        iters = info.converged_iter.to(x.device).clone()
        iters[iters < 0] = self.max_iter
        extras = {
            "costates": costates,
            "status": status,
            "residual": grad_norm,
            "error": info.last_err.detach(),
        }
        # The cost of a failed row is evaluated at zeros and replaced by NaN, so that its
        # (zero) gradient stays finite on the way to tensors the rows share.
        rows = keep.view(-1, 1, 1)
        value = cost.evaluate(torch.where(rows, x, 0), torch.where(rows, u, 0))
        value = torch.where(keep, value, float("nan"))
        return Solution(x, u, value, converged, iters, extras)

    @staticmethod
    def _implicit(problem: ShootingProblem, theta: tuple[Tensor, ...], U_sol: Tensor):
        """The solution ``U* (B, T·m)`` and its rollout ``x (B, T+1, n)`` with the implicit
        gradient attached (see :class:`ImplicitShooting`). Rows whose controls or rollout are
        not finite (an optimizer that diverged, dynamics that returned NaN) are left out: they
        keep their values, get no gradient and nothing of them reaches another row or a shared
        tensor (their dynamics are not evaluated again)."""
        with torch.no_grad():
            x = problem.rollout(U_sol, tuple(t.detach() for t in theta))
        bad = ~(torch.isfinite(U_sol).all(-1) & torch.isfinite(x).flatten(1).all(-1))
        sub, sub_theta, U = problem, theta, U_sol
        if bad.any():
            good = (~bad).nonzero().squeeze(-1)
            if len(good) == 0:
                return U_sol, x
            sub, sub_theta, U = problem.subset(good), problem.take(theta, good), U_sol[good]
        # The stationarity residual with a graph to everything J uses; U* enters as a
        # detached leaf.
        U_leaf = U.clone().requires_grad_(True)
        J = sub.objective(U_leaf, sub_theta, functional=False).sum()
        (G,) = torch.autograd.grad(J, U_leaf, create_graph=True)
        U = ImplicitShooting.apply(U, G, sub, sub_theta)
        if not bad.any():
            return U, problem.rollout(U, theta)
        x_good = sub.rollout(U, sub_theta)
        return U_sol.index_put((good,), U), x.index_put((good,), x_good)

    @staticmethod
    def _factors(cost: QuadraticCost, theta: tuple[Tensor, ...]):
        """Residual factors of a quadratic cost: ``C_t = L_t L_tᵀ``, ``a_t = L_t⁻¹ c_t`` and
        the terminal pair (zeros without a terminal term)."""
        L = _factor("cost.C", theta[1], 0.0)
        a = torch.linalg.solve_triangular(L, theta[2].unsqueeze(-1), upper=False)[..., 0]
        if cost.C_final is None:
            return L, a, theta[3], theta[4]  # zeros: no terminal residual
        L_f = _factor("cost.C_final", theta[3], 0.0)
        a_f = torch.linalg.solve_triangular(L_f, theta[4].unsqueeze(-1), upper=False)[..., 0]
        return L, a, L_f, a_f

    def _solve(self, th, problem: ShootingProblem, theta, factors, U0: Tensor):
        """Build the Theseus objective for this call and run the optimizer."""
        B = U0.shape[0]
        U_var = th.Vector(tensor=U0.detach().clone(), name="U")
        # Batched tensors are Theseus aux variables (vmap slices them per row); a dynamics
        # module's parameters are shared by all rows and stay in the closure.
        n_batched = 1 + problem.n_cost + (2 if isinstance(problem.dynamics, LinearDynamics) else 0)
        shared = tuple(theta[n_batched:])
        aux_t = list(theta[:n_batched]) + list(factors)
        aux = [th.Variable(t.reshape(B, -1), name=f"aux{i}") for i, t in enumerate(aux_t)]
        shapes = [t.shape[1:] for t in aux_t]

        def err_fn(optim_vars, aux_vars):
            U = optim_vars[0].tensor
            ts = [
                v.tensor.reshape(v.tensor.shape[0], *s)
                for v, s in zip(aux_vars, shapes, strict=True)
            ]
            return problem.residuals(U, (*ts[:n_batched], *shared), tuple(ts[n_batched:]))

        weight = th.ScaleCostWeight(torch.ones(1, 1, dtype=U0.dtype, device=U0.device))
        if self.autograd_mode == "analytic":
            cost_fn = shooting_cost_class(th)(
                U_var, aux, problem, shared, n_batched, shapes, weight, "trajectory_cost"
            )
        else:
            cost_fn = th.AutoDiffCostFunction(
                [U_var],
                err_fn,
                problem.res_dim,
                aux_vars=aux,
                name="trajectory_cost",
                cost_weight=weight,
                autograd_mode=self.autograd_mode,
            )
        objective = th.Objective(dtype=U0.dtype)
        objective.add(cost_fn)
        cls = th.GaussNewton if self.optimizer == "gauss_newton" else th.LevenbergMarquardt
        opt = cls(
            objective,
            max_iterations=self.max_iter,
            step_size=self.step_size,
            abs_err_tolerance=self.abs_err_tolerance,
            rel_err_tolerance=self.rel_err_tolerance,
        )
        layer = th.TheseusLayer(opt).to(U0.device)
        inputs = {"U": U0.detach().clone()}
        inputs.update({v.name: v.tensor for v in aux})
        mode = "UNROLL" if self.backward == "implicit" else _THESEUS_MODES[self.backward]
        kwargs: dict[str, Any] = {"backward_mode": mode, "verbose": False}
        if mode == "TRUNCATED":
            kwargs["backward_num_iterations"] = min(self.backward_num_iterations, self.max_iter)
        if mode == "DLM":
            kwargs["dlm_epsilon"] = float(self.dlm_epsilon)
        if self.optimizer == "levenberg_marquardt":
            kwargs["damping"] = self.damping
        values, info = layer.forward(inputs, optimizer_kwargs=kwargs)
        return values["U"], info
