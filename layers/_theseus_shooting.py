"""TheseusTO's shooting problem: the controls as the variables, the rollout inside the cost.

:class:`ShootingProblem` holds one call's tensors and the maps TheseusTO needs (rollout,
objective, residuals and their Jacobians); :func:`shooting_cost_class` wraps them as a Theseus
cost function; :class:`ImplicitShooting` attaches the exact implicit gradient to a solution.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from diffto.autodiff import rowwise_jacobian
from diffto.layers._checked_solve import checked_solve
from diffto.problem import LinearDynamics, QuadraticCost

__all__: list[str] = []


class ShootingProblem:
    """Tensors of one call, batch-expanded, and the shooting maps on them.

    ``theta`` holds, in order: ``x0 (B, n)``; for a :class:`~diffto.QuadraticCost`,
    ``C (B, T, k, k)`` (regularized), ``c (B, T, k)``, ``C_f (B, n, n)``, ``c_f (B, n)``; for
    :class:`~diffto.problem.LinearDynamics`, ``F (B, T, n, k)``, ``f (B, T, n)``; then a
    dynamics module's parameters. A :class:`~diffto.LeastSquaresCost` is held as ``cost``
    (its tensors stay in its closures).
    """

    def __init__(self, dynamics: Any, cost: Any, T: int, n: int, m: int) -> None:
        self.dynamics, self.T, self.n, self.m = dynamics, T, n, m
        self.quadratic = isinstance(cost, QuadraticCost)
        self.cost = None if self.quadratic else cost
        self.n_cost = 4 if self.quadratic else 0  # cost tensors in theta after x0
        self.param_names: list[str] = []
        self.res_dim = 0  # length of the residual vector, set by the layer
        self.B = 0
        self.rows: Tensor | None = None  # see subset()

    def subset(self, rows: Tensor) -> ShootingProblem:
        """The same problem restricted to the batch rows ``rows`` (theta sliced by
        :meth:`take`): dynamics run on those rows only; a general cost, whose tensors may have
        the full batch, is evaluated on the full batch with the other rows at zero."""
        sub = ShootingProblem(self.dynamics, self.cost, self.T, self.n, self.m)
        sub.quadratic, sub.n_cost, sub.cost = self.quadratic, self.n_cost, self.cost
        sub.param_names, sub.res_dim, sub.B = self.param_names, self.res_dim, self.B
        sub.rows = rows
        return sub

    def take(self, theta: tuple[Tensor, ...], rows: Tensor) -> tuple[Tensor, ...]:
        """``theta`` with its batched entries restricted to ``rows`` (module parameters are
        shared and stay whole)."""
        n_batched = 1 + self.n_cost + (2 if isinstance(self.dynamics, LinearDynamics) else 0)
        return tuple(t[rows] if i < n_batched else t for i, t in enumerate(theta))

    def rollout(self, U: Tensor, theta: tuple[Tensor, ...], functional: bool = False,
                eps: Tensor | None = None) -> Tensor:
        """States ``(B, T+1, n)`` from controls ``U (B, T·m)``. With ``functional`` a dynamics
        module runs with the parameters in ``theta`` (copies), else with its own. ``eps
        (B, T+1, n)`` is added to every state (zeros whose gradients are the costates)."""
        x0, F, f, params = theta[0], *self._dyn(theta)
        params = params if functional else None
        dyn = self.dynamics
        u = U.reshape(U.shape[0], self.T, self.m)
        xs = [x0.expand(U.shape[0], -1)]
        if eps is not None:
            xs[0] = xs[0] + eps[:, 0]
        for t in range(self.T):
            if F is not None:
                tau = torch.cat([xs[-1], u[:, t]], -1)
                x_next = torch.einsum("bij,bj->bi", F[:, t], tau) + f[:, t]
            elif params is not None:
                x_next = torch.func.functional_call(dyn, params, (xs[-1], u[:, t]))
            else:
                x_next = dyn(xs[-1], u[:, t])
            xs.append(x_next if eps is None else x_next + eps[:, t + 1])
        return torch.stack(xs, 1)

    def _dyn(self, theta):
        i = 1 + self.n_cost
        if isinstance(self.dynamics, LinearDynamics):
            return theta[i], theta[i + 1], None
        if isinstance(self.dynamics, nn.Module):
            return None, None, dict(zip(self.param_names, theta[i:], strict=True))
        return None, None, None

    def objective(self, U: Tensor, theta: tuple[Tensor, ...], functional: bool = True,
                  eps: Tensor | None = None) -> Tensor:
        """The trajectory cost ``J (B,)`` of controls ``U (B, T·m)``."""
        x = self.rollout(U, theta, functional, eps)
        u = U.reshape(U.shape[0], self.T, self.m)
        if not self.quadratic and self.rows is not None:
            full = (self.B, *x.shape[1:]), (self.B, *u.shape[1:])
            x = x.new_zeros(full[0]).index_put((self.rows,), x)
            u = u.new_zeros(full[1]).index_put((self.rows,), u)
            return self.cost.evaluate(x, u)[self.rows]
        if not self.quadratic:
            return self.cost.evaluate(x, u)
        _, C, c, C_f, c_f = theta[:5]
        tau = torch.cat([x[:, :-1], u], -1)  # (B, T, k)
        J = 0.5 * torch.einsum("bti,btij,btj->b", tau, C, tau) + (c * tau).sum((-1, -2))
        xT = x[:, -1]
        return J + 0.5 * torch.einsum("bi,bij,bj->b", xT, C_f, xT) + (c_f * xT).sum(-1)

    def _stage_residuals(self, x: Tensor, u: Tensor, factors) -> tuple[Tensor, Tensor]:
        """``r (B, T, r)`` and ``r_f (B, r_f)``: ``L_tᵀ τ_t + L_t⁻¹ c_t`` and the terminal one
        for a quadratic cost (``factors``), the cost's own residuals otherwise."""
        if not self.quadratic:
            r, r_f = self.cost.residuals(x, u)
            return r, x.new_zeros(x.shape[0], 0) if r_f is None else r_f
        L, a, L_f, a_f = factors
        tau = torch.cat([x[:, :-1], u], -1)  # (B, T, k)
        r = torch.einsum("btji,btj->bti", L, tau) + a  # L_tᵀ τ_t + a_t
        return r, torch.einsum("bji,bj->bi", L_f, x[:, -1]) + a_f

    def residuals(self, U: Tensor, theta: tuple[Tensor, ...], factors) -> Tensor:
        """Least-squares residuals ``(B, T·r + r_f)``, stages then terminal."""
        x = self.rollout(U, theta)
        r, r_f = self._stage_residuals(x, U.reshape(U.shape[0], self.T, self.m), factors)
        return torch.cat([r.reshape(U.shape[0], -1), r_f], -1)

    def stage_jacobians(self, x: Tensor, u: Tensor, theta) -> tuple[Tensor, Tensor]:
        """``A_t = ∂φ/∂x (B, T, n, n)`` and ``B_t = ∂φ/∂u (B, T, n, m)`` at ``x (B, T, n)``,
        ``u (B, T, m)``; one vmapped ``jacrev`` over all ``B·T`` stages for a module."""
        n, m = self.n, self.m
        if isinstance(self.dynamics, LinearDynamics):
            F = theta[1 + self.n_cost]  # (B, T, n, n+m)
            return F[..., :n], F[..., n:]
        dyn = self.dynamics
        B, T = x.shape[:2]

        def step(xi: Tensor, ui: Tensor) -> Tensor:
            return dyn(xi.unsqueeze(0), ui.unsqueeze(0))[0]

        jac = torch.func.vmap(torch.func.jacrev(step, argnums=(0, 1)))
        A, Bm = jac(x.reshape(B * T, n), u.reshape(B * T, m))
        return A.reshape(B, T, n, n), Bm.reshape(B, T, n, m)

    def gauss_newton_hessian(self, U: Tensor, theta) -> Tensor:
        """``JᵀJ (B, T·m, T·m)`` with ``J = ∂r/∂U`` for the factors of ``theta``'s quadratic
        cost."""
        L = torch.linalg.cholesky(theta[1])
        L_f = torch.linalg.cholesky(theta[3]) if theta[3].abs().sum() > 0 else theta[3]
        zeros = (L.new_zeros(L.shape[:-1]), L_f.new_zeros(L_f.shape[:-1]))
        J, _ = self.residual_jacobian(U, theta, (L, zeros[0], L_f, zeros[1]))
        return J.transpose(-1, -2) @ J

    def _residual_stage_jacobians(self, x: Tensor, u: Tensor, factors):
        """``∂r_t/∂τ_t (B, T, r, k)``, ``∂r_f/∂x_T (B, r_f, n)`` and the residuals. For a
        quadratic cost these are ``L_tᵀ`` and ``L_fᵀ``; for least squares they come from
        autograd, one reverse pass per residual entry over all stages at once (the residual
        of stage t depends on τ_t only), with a graph when grad mode is on (``"unroll"``)."""
        if self.quadratic:
            L, _, L_f, _ = factors
            r, r_f = self._stage_residuals(x, u, factors)
            return L.transpose(-1, -2), L_f.transpose(-1, -2), r, r_f
        graph = torch.is_grad_enabled()
        with torch.enable_grad():
            tau = torch.cat([x[:, :-1], u], -1)
            xT = x[:, -1]
            if not (graph and tau.requires_grad):
                tau, xT = tau.detach().requires_grad_(), xT.detach().requires_grad_()
            n = self.n
            r, _ = self.cost.residuals(tau[..., :n], tau[..., n:])
            J = rowwise_jacobian(r, tau, create_graph=graph)
            if self.cost.terminal_residual is None:
                r_f = x.new_zeros(x.shape[0], 0)
                J_f = x.new_zeros(x.shape[0], 0, n)
            else:
                r_f = self.cost.terminal_residual(xT)
                J_f = rowwise_jacobian(r_f, xT, create_graph=graph)
        if not graph:
            J, J_f, r, r_f = J.detach(), J_f.detach(), r.detach(), r_f.detach()
        return J, J_f, r, r_f

    def residual_jacobian(self, U: Tensor, theta, factors) -> tuple[Tensor, Tensor]:
        """``∂r/∂U (B, T·r + r_f, T·m)`` and ``r``, by forward sensitivities of the rollout:
        ``S_{t+1} = A_t S_t + B_t E_t`` with ``S_t = ∂x_t/∂U`` and ``E_t`` selecting ``u_t``,
        then ``∂r_t/∂U = R_t [S_t; E_t]`` with ``R_t = ∂r_t/∂τ_t``."""
        B, T, n, m = U.shape[0], self.T, self.n, self.m
        x = self.rollout(U, theta)
        u = U.reshape(B, T, m)
        A, Bm = self.stage_jacobians(x[:, :-1], u, theta)
        R, R_f, r, r_f = self._residual_stage_jacobians(x, u, factors)
        width = T * m
        S = U.new_zeros(B, n, width)  # ∂x_0/∂U
        rows = []
        for t in range(T):
            Rt = R[:, t]  # (B, r, k)
            pad = (t * m, width - (t + 1) * m)
            rows.append(Rt[:, :, :n] @ S + nn.functional.pad(Rt[:, :, n:], pad))
            S = A[:, t] @ S + nn.functional.pad(Bm[:, t], pad)
        rows.append(R_f @ S)
        return torch.cat(rows, 1), torch.cat([r.reshape(B, -1), r_f], -1)


_SHOOTING_COST: list[type] = []


def shooting_cost_class(th) -> type:
    """The Theseus cost function of the shooting residuals with analytic Jacobians (built on
    first use, because Theseus is imported lazily)."""
    if _SHOOTING_COST:
        return _SHOOTING_COST[0]

    class ShootingCost(th.CostFunction):
        """Residuals of :meth:`ShootingProblem.residuals` on the optimization variable ``U``; the
        batched tensors are aux variables, a dynamics module's parameters are ``shared``."""

        def __init__(self, U, aux, problem, shared, n_batched, shapes, weight, name=None):
            super().__init__(weight, name=name)
            self.U = U
            self._aux_names = [f"aux{i}" for i in range(len(aux))]
            for attr, var in zip(self._aux_names, aux, strict=True):
                setattr(self, attr, var)
            self.register_optim_vars(["U"])
            self.register_aux_vars(self._aux_names)
            self.problem, self.shared = problem, shared
            self.n_batched, self.shapes = n_batched, shapes

        def _args(self):
            ts = [
                getattr(self, a).tensor.reshape(-1, *s)
                for a, s in zip(self._aux_names, self.shapes, strict=True)
            ]
            return (*ts[: self.n_batched], *self.shared), tuple(ts[self.n_batched :])

        def error(self) -> Tensor:
            return self.problem.residuals(self.U.tensor, *self._args())

        def jacobians(self):
            J, err = self.problem.residual_jacobian(self.U.tensor, *self._args())
            return [J], err

        def dim(self) -> int:
            return self.problem.res_dim

        def _copy_impl(self, new_name=None):
            aux = [getattr(self, a).copy() for a in self._aux_names]
            return ShootingCost(
                self.U.copy(),
                aux,
                self.problem,
                self.shared,
                self.n_batched,
                self.shapes,
                self.weight.copy(),
                name=new_name,
            )

    _SHOOTING_COST.append(ShootingCost)
    return ShootingCost


class ImplicitShooting(torch.autograd.Function):
    """Identity on the solution ``U*``; its backward hands the stationarity residual ``G`` the
    adjoint, so autograd finishes the implicit derivative through ``G``'s own graph."""

    @staticmethod
    def forward(U_star: Tensor, G: Tensor, problem: ShootingProblem, theta: tuple) -> Tensor:
        return U_star.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        U_star, _, problem, theta = inputs
        ctx.problem, ctx.theta = problem, tuple(t.detach() for t in theta)
        ctx.save_for_backward(U_star)

    # U*(θ) satisfies the stationarity condition G(U*, θ) = ∇_U J(U*, θ) = 0. Differentiating,
    #     H dU* + (∂G/∂θ) dθ = 0,   H = ∇²_UU J   (the full Hessian, not JᵀJ),
    # so for a seed v on U*:  vᵀ dU*/dθ = −λᵀ ∂G/∂θ with H λ = v (H is symmetric).
    # The forward pass computed G at U* with a graph to every tensor J uses (x0, the cost's
    # tensors and whatever a cost or dynamics module closes over), with U* a detached leaf; this
    # backward returns −λ as G's gradient and autograd forms −λᵀ ∂G/∂θ along that graph: the
    # residual-injection form of the implicit function theorem, which reaches tensors no
    # argument list names. Rows are independent, so H is block diagonal over the batch: its
    # column j for every row at once is the Hessian-vector product with the unit seed e_j in
    # every row (T·m products). With linear dynamics and a quadratic cost the residuals are
    # linear in U and H = JᵀJ exactly, formed directly.
    @staticmethod
    def backward(ctx, v: Tensor):
        (U_star,) = ctx.saved_tensors
        problem: ShootingProblem = ctx.problem
        with torch.enable_grad():
            U = U_star.detach().requires_grad_(True)
            th = ctx.theta
            if isinstance(problem.dynamics, LinearDynamics) and problem.quadratic:
                H = problem.gauss_newton_hessian(U.detach(), th)
            else:
                J = problem.objective(U, th, functional=False).sum()
                (G,) = torch.autograd.grad(J, U, create_graph=True)  # (B, T·m)
                cols = []
                for j in range(U.shape[1]):
                    (h,) = torch.autograd.grad(G[:, j].sum(), U, retain_graph=True)
                    cols.append(h)  # (B, T·m) = H[:, :, j]
                H = torch.stack(cols, -1)  # (B, T·m, T·m)
        lam = checked_solve(
            H.detach(), v, "TheseusTO implicit backward: the Hessian solve failed"
        )
        return None, -lam, None, None
