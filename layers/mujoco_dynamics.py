"""MuJoCo models as differentiable discrete-time dynamics: ``x_next = f(x, u)`` by MuJoCo steps.

:class:`MujocoDynamics` wraps any ``mujoco.MjModel`` whose joints are hinges and slides as a
dynamics module of the solver layers: ``(x (N, n), u (N, m)) -> x_next (N, n)`` with
``x = [qpos; qvel]`` and ``u = ctrl``, plus ``jacobians(x, u) -> (A, B)`` from MuJoCo's
finite-difference transition derivatives (``mjd_transitionFD``). The layers use ``jacobians``
instead of ``torch.func`` when a dynamics module has one; plain autograd through ``forward``
uses the same matrices (a private autograd Function), so unrolled rollouts differentiate too.

The file is named ``mujoco_dynamics.py`` and not ``mujoco.py``: a module of that name inside
``layers/`` would shadow the ``mujoco`` package for code that imports it from here.
"""

from __future__ import annotations

import copy
import math
from concurrent.futures import ThreadPoolExecutor

import mujoco
import numpy as np
import torch
from mujoco import rollout as mj_rollout
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

__all__ = ["MujocoDynamics"]

# MuJoCo's own test for a bad value (mju_isBad): NaN, or |v| > mjMAXVAL.
_MAXVAL = float(mujoco.mjMAXVAL)
_UNSUPPORTED_JOINTS = {
    int(mujoco.mjtJoint.mjJNT_FREE): "free",
    int(mujoco.mjtJoint.mjJNT_BALL): "ball",
}
_FD_SPEC = int(
    mujoco.mjtState.mjSTATE_TIME | mujoco.mjtState.mjSTATE_QPOS | mujoco.mjtState.mjSTATE_QVEL
    | mujoco.mjtState.mjSTATE_WARMSTART | mujoco.mjtState.mjSTATE_CTRL
)


class _MujocoStep(torch.autograd.Function):
    """``(x (N, n), u (N, m), dynamics) -> x_next (N, n)`` with the finite-difference
    Jacobians of :meth:`MujocoDynamics.jacobians` as its derivative."""

    @staticmethod
    def forward(x: Tensor, u: Tensor, dynamics: MujocoDynamics) -> Tensor:
        return dynamics._step(x, u)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, u, dynamics = inputs
        ctx.save_for_backward(x, u)
        ctx.dynamics = dynamics

    # Vector-Jacobian products of x_next = f(x, u): x̄ = Aᵀ ḡ, ū = Bᵀ ḡ with A = ∂f/∂x and
    # B = ∂f/∂u evaluated at the saved inputs (recomputed here, so a forward whose output is
    # never differentiated costs no Jacobians). The matrices are finite differences, not
    # functions of x and u that autograd could differentiate again: once_differentiable.
    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        x, u = ctx.saved_tensors
        A, B = ctx.dynamics.jacobians(x, u)
        g = grad.to(A.dtype).unsqueeze(-2)  # (N, 1, n)
        gx = (g @ A).squeeze(-2).to(x.dtype) if ctx.needs_input_grad[0] else None  # (N, n)
        gu = (g @ B).squeeze(-2).to(u.dtype) if ctx.needs_input_grad[1] else None  # (N, m)
        return gx, gu, None


class MujocoDynamics(nn.Module):
    """A MuJoCo model as the dynamics ``x_{k+1} = f(x_k, u_k)`` of a solver layer.

    **One call.** With ``x = [q; v]`` (``qpos``, ``qvel``; ``n = nq + nv``) and ``u = ctrl``
    (``m = nu``), one call runs ``s = substeps`` MuJoCo steps with the control held:

    .. math::

        f(x, u) = Φ^s(x, u) = Φ(Φ(\\dots Φ(x, u) \\dots, u), u),

    where ``Φ`` is one ``mj_step`` of the model's own integrator and ``timestep`` ``h``, so
    one call advances ``dt = s h`` seconds. Everything else in MuJoCo's state starts clean at
    each call (time 0, zero warm start, no applied forces), so ``f`` is a function of
    ``(x, u)`` alone and rows do not depend on each other.
    MuJoCo clamps ``ctrl`` to ``ctrlrange`` where an actuator is ``ctrllimited``; ``f`` is
    flat in such a control outside its range.

    **Jacobians.** ``mjd_transitionFD`` gives ``A_j = ∂Φ/∂x`` and ``B_j = ∂Φ/∂u`` at
    ``(x_{j-1}, u)`` by forward or centered differences with step ``eps`` (centered: error
    ``O(eps²)`` plus rounding ``O(ε_mach / eps)``). Over the substeps, by the chain rule,

    .. math::

        A = A_s A_{s-1} \\cdots A_1, \\qquad
        B = \\sum_{j=1}^{s} A_s \\cdots A_{j+1} B_j ,

    computed as ``A ← A_j A``, ``B ← A_j B + B_j``. MuJoCo differentiates in tangent space;
    for hinge and slide joints the tangent space is the ``qpos`` coordinates themselves, which
    is why only those joints are accepted so far (free and ball joints have quaternions in
    ``qpos``, ``nq != nv``, and actuator activations ``act`` would be part of the state: both
    raise ``ValueError`` until a tangent-space state is supported). ``B`` is zero in the
    columns of controls outside their ``ctrlrange`` (clamped): :attr:`u_lower` and
    :attr:`u_upper` ``(m,)`` give those ranges (``±inf`` where not limited) so that an MPC can
    check that its own control bounds lie inside them.

    **What the gradients are.** Gradients reach ``x`` and ``u`` (and through a solver layer
    its ``x0``, cost and goals); the model's parameters (masses, gains, geometry) are plain
    numbers in a C struct and are not differentiable. Contacts, joint limits and friction make
    ``f`` nonsmooth: a finite difference across a contact change (a contact that appears or
    breaks, stick to slip) is the secant slope over ``[x - eps, x + eps]``, a local slope of
    one smooth piece or a blend of two, not a derivative; gradients through such states are
    as meaningful as that slope. MuJoCo gives first derivatives only, so the curvature of the
    dynamics is unavailable: the exact implicit gradient of an MPC plan contains, in the
    Hessian of the Lagrangian, the term ``Σ_i λ_{t+1,i} ∇²_{ττ} f_i(τ_t)`` (costates ``λ``,
    ``τ = [x; u]``), and the MPC backward over a ``MujocoDynamics`` treats it as zero (its
    forward solve is then Gauss-Newton in the dynamics too). The error grows with the
    costates and the curvature of ``f`` and vanishes for dynamics that are affine in
    ``(x, u)``: on the torque-limited pendulum of ``tests/layers/test_mujoco_dynamics.py`` the
    plan gradients w.r.t. ``x0`` and a goal are off the exact ones by 0.2–4.7% of their
    largest entry (0.9% on the problem the tests fix). Centered differences are accurate to
    about ``1e-10`` there, which bounds how tightly an MPC over this module converges: below
    ``tol ≈ 1e-8`` rows stall (flagged unconverged) instead of converging.

    **Failed rows.** A row returns NaN (and NaN Jacobians) instead of raising, so that a
    batched solver can flag it and carry on with the others, when its input or any state it
    passes through is bad by MuJoCo's own test (NaN, ±inf or ``|v| > mjMAXVAL = 1e10``:
    ``mjWARN_BADQPOS`` / ``BADQVEL`` / ``BADCTRL``), when its implied acceleration ``Δv / h``
    is (``mjWARN_BADQACC``), or when MuJoCo stopped it with any other warning before its last
    substep (a full contact or constraint buffer; ``mujoco.rollout`` stops a row at a warning).
    A NaN or infinite input gives a NaN row as well rather than a ``ValueError``: a solver
    keeps stepping a row that has failed (its state is NaN from then on), and one failed row
    must not stop the batch. Shapes and dtypes are checked (``ValueError``). MuJoCo's
    automatic reset on bad values is disabled in the module's copy of the model, so a bad
    state is reported, not replaced by ``qpos0``.

    **Where it runs.** MuJoCo runs on the CPU in float64: inputs are moved there, and outputs
    (and gradients) come back in ``x``'s dtype and device, so the module works beside CUDA
    tensors at the cost of the transfers. Steps go through ``mujoco.rollout``: measured on
    the Panda (``benchmarks/bench_mujoco_dynamics.py``, 2 shared cores) it is the fastest way
    from 16 rows up with one substep (1.5–3.5× less time per row than a Python loop) and about
    equal to a loop with 10 substeps; for a single row a bare loop is faster, and the module's
    checks add a fixed cost of the order of 0.1 ms per call. Jacobians are one
    ``mjd_transitionFD`` per row and substep, on ``nthread`` threads when ``nthread > 0``
    (MuJoCo releases the GIL; on 2 busy cores threads gained 10% at most). ``torch.func``
    transforms (``vmap``, ``jacrev``) cannot trace into MuJoCo: use :meth:`jacobians`.

    Args:
        model: a ``mujoco.MjModel`` with hinge and slide joints only, no actuator activations,
            at least one actuator. The module keeps its own copy (taken here): later edits of
            ``model`` do not reach it; edit :attr:`model` instead (sizes and ``ctrlrange``,
            hence :attr:`u_lower` / :attr:`u_upper`, are read here once).
        substeps: physics steps per call, ``>= 1``.
        eps: finite-difference step of ``mjd_transitionFD``, ``> 0``.
        centered: centered (``True``) or forward differences.
        nthread: ``0`` steps and differentiates on the calling thread; ``k > 0`` uses ``k``
            threads (MuJoCo releases the GIL), worth it on machines with idle cores.

    Example::

        import mujoco, torch
        from diffto.layers import MujocoDynamics

        model = mujoco.MjModel.from_xml_path("pendulum.xml")   # one hinge, one motor
        dynamics = MujocoDynamics(model, substeps=5)             # dt = 5 * timestep
        x = torch.zeros(8, dynamics.n_state, dtype=torch.float64, requires_grad=True)
        u = torch.zeros(8, dynamics.n_ctrl, dtype=torch.float64, requires_grad=True)
        x_next = dynamics(x, u)                   # (8, n)
        A, B = dynamics.jacobians(x, u)           # (8, n, n), (8, n, m)
        x_next.sum().backward()                   # x.grad = Σ_i A[:, i, :]
    """

    def __init__(
        self,
        model: mujoco.MjModel,
        substeps: int = 1,
        eps: float = 1e-6,
        centered: bool = True,
        nthread: int = 0,
    ) -> None:
        super().__init__()
        if not isinstance(model, mujoco.MjModel):
            raise ValueError(f"model must be a mujoco.MjModel, got {type(model).__name__}")
        _check_supported(model)
        if isinstance(substeps, bool) or not isinstance(substeps, int) or substeps < 1:
            raise ValueError(f"substeps must be an int >= 1, got {substeps!r}")
        if not (isinstance(eps, int | float) and math.isfinite(eps) and eps > 0):
            raise ValueError(f"eps must be a finite float > 0, got {eps!r}")
        if isinstance(nthread, bool) or not isinstance(nthread, int) or nthread < 0:
            raise ValueError(f"nthread must be an int >= 0, got {nthread!r}")
        self.model = copy.copy(model)  # mj_copyModel: our flags never touch the caller's model
        # A bad state is to be reported (NaN row), not silently reset to qpos0.
        self.model.opt.disableflags |= int(mujoco.mjtDisableBit.mjDSBL_AUTORESET)
        self.substeps, self.eps, self.centered = substeps, float(eps), bool(centered)
        self.nthread = nthread
        self.n_state, self.n_ctrl = model.nq + model.nv, model.nu
        self.timestep = float(model.opt.timestep)
        self.dt = substeps * self.timestep
        lower, upper = _control_limits(self.model)
        # Buffers so that .to() moves them; not in state_dict: they follow from the model.
        self.register_buffer("u_lower", torch.as_tensor(lower, dtype=torch.float64),
                             persistent=False)
        self.register_buffer("u_upper", torch.as_tensor(upper, dtype=torch.float64),
                             persistent=False)
        self._data = [mujoco.MjData(self.model) for _ in range(max(nthread, 1))]
        self._runner = self._pool = None  # created on first use; not pickled

    # ------------------------------------------------------------------ public calls
    def forward(self, x: Tensor, u: Tensor) -> Tensor:
        """One call, ``substeps`` physics steps: ``x (N, n)``, ``u (N, m)`` -> ``(N, n)``.

        Differentiable w.r.t. ``x`` and ``u`` (backward by :meth:`jacobians`); NaN in rows
        that failed (see the class docstring)."""
        self._check(x, u)
        if torch.is_grad_enabled() and (x.requires_grad or u.requires_grad):
            return _MujocoStep.apply(x, u, self)
        return self._step(x, u)

    def jacobians(self, x: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
        """``A = ∂f/∂x (N, n, n)`` and ``B = ∂f/∂u (N, n, m)`` of one call at ``x (N, n)``,
        ``u (N, m)``, chained over the substeps; in ``x``'s dtype and device, not
        differentiable; NaN in the rows where :meth:`forward` gives NaN."""
        self._check(x, u)
        xn, un = _to_numpy(x), _to_numpy(u)
        # The states each substep starts from, and the failed rows, by the same rollout as
        # forward (a few percent of the cost of the differences).
        path, bad = self._simulate(xn, un)
        starts = np.concatenate([xn[:, None], path[:, :-1]], 1)  # (N, s, n)
        A, B = self._transition_fd(starts, un, bad)
        return _to_torch(A, x), _to_torch(B, x)

    # ------------------------------------------------------------------ internals
    def _step(self, x: Tensor, u: Tensor) -> Tensor:
        path, bad = self._simulate(_to_numpy(x), _to_numpy(u))
        out = path[:, -1]
        out[bad] = np.nan
        return _to_torch(out, x)

    def _check(self, x: Tensor, u: Tensor) -> None:
        """Shapes and dtypes; non-finite entries are failed rows, not errors (see the class
        docstring)."""
        for name, value, dim in (("x", x, self.n_state), ("u", u, self.n_ctrl)):
            if not isinstance(value, Tensor) or value.dim() != 2 or value.shape[-1] != dim:
                shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(f"{name} must be a tensor of shape (N, {dim}), got {shape}")
            if not value.is_floating_point():
                raise ValueError(f"{name} must be a floating-point tensor, got {value.dtype}")
        if x.shape[0] != u.shape[0]:
            raise ValueError(
                f"x and u must share the batch size N, got {x.shape[0]} and {u.shape[0]}"
            )

    def _simulate(self, x: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """States after each substep ``(N, s, n)`` and the failed rows ``(N,)`` bool, from
        float64 ``x (N, n)``, ``u (N, m)``."""
        N, s, n, nq, h = x.shape[0], self.substeps, self.n_state, self.model.nq, self.timestep
        bad = _bad_inputs(x, u)
        states = np.empty((N, s, 1 + n))
        if N == 0:
            return states[:, :, 1:], bad
        self._step_rollout(x, u, bad, states)
        path = states[:, :, 1:]
        # rollout stops a row at a MuJoCo warning and repeats its last state: its clock then
        # ends short of s h. A warning in the last step leaves the clock alone, but the bad
        # qpos/qvel/qacc it reports show in the states (autoreset is off) or in Δv / h.
        # Comparisons written as ~(a <= b) are True for NaN as well.
        v = np.concatenate([x[:, None, nq:], path[:, :, nq:]], 1)  # (N, s+1, nv)
        with np.errstate(invalid="ignore", over="ignore"):  # inf - inf in a failed row
            size = np.abs(path).max((1, 2))
            jump = np.abs(np.diff(v, axis=1)).max((1, 2))
        bad |= ~(size <= _MAXVAL) | ~(jump <= _MAXVAL * h) | (states[:, -1, 0] < (s - 0.5) * h)
        return path, bad

    def _step_rollout(self, x, u, bad, states) -> None:
        """``states (N, s, 1 + n)`` ([time, qpos, qvel] after each substep) by
        ``mujoco.rollout``, which stops a row at a MuJoCo warning."""
        N, s, n = x.shape[0], self.substeps, self.n_state
        # rollout's full physics state is [time, qpos, qvel] for these models (checked at
        # construction); the control is held over the substeps.
        state0 = np.zeros((N, 1 + n))
        state0[:, 1:] = x
        ctrl = np.empty((N, s, self.n_ctrl))
        ctrl[:] = u[:, None]
        if bad.any():  # MuJoCo would warn and replace these: step a zero row in their place
            state0[bad, 1:] = 0.0
            ctrl[bad] = 0.0
        if self._runner is None:
            self._runner = mj_rollout.Rollout(nthread=self.nthread)
        # skip_checks: the shapes are built right here; it saves the wrapper's tiling.
        self._runner.rollout([self.model] * N, self._data, state0, ctrl, skip_checks=True,
                             nstep=s, state=states)

    def _transition_fd(
        self, starts: np.ndarray, u: np.ndarray, bad: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Chained ``A (N, n, n)``, ``B (N, n, m)`` from the states ``starts (N, s, n)`` at
        which each substep begins; NaN in the ``bad (N,)`` rows and where a difference came
        out non-finite or beyond ``mjMAXVAL``."""
        N, n, m = u.shape[0], self.n_state, self.n_ctrl
        A, B = np.empty((N, n, n)), np.empty((N, n, m))
        rows = np.flatnonzero(~bad)
        if self.nthread > 0 and len(rows) > 1:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.nthread)
            chunks = np.array_split(rows, min(self.nthread, len(rows)))
            list(self._pool.map(lambda d, r: self._fd_rows(d, r, starts, u, A, B),
                                self._data, chunks))
        else:
            self._fd_rows(self._data[0], rows, starts, u, A, B)
        bad = bad | ~(np.abs(A) <= _MAXVAL).all((1, 2)) | ~(np.abs(B) <= _MAXVAL).all((1, 2))
        A[bad], B[bad] = np.nan, np.nan
        return A, B

    def _fd_rows(self, d, rows, starts, u, A, B) -> None:
        """Fill ``A[rows]``, ``B[rows]`` using the MjData ``d`` (one per thread)."""
        mdl, n, m, nv = self.model, self.n_state, self.n_ctrl, self.model.nv
        # [time, qpos, qvel, qacc_warmstart, ctrl] in mj_setState's order: each difference
        # starts at time 0 with a zero warm start, whatever the previous row left in d.
        state = np.zeros(1 + n + nv + m)
        A_j, B_j = np.empty((n, n)), np.empty((n, m))
        for i in rows:
            state[1 + n + nv :] = u[i]
            if self.substeps == 1:  # straight into the outputs (C-contiguous slices)
                state[1 : 1 + n] = starts[i, 0]
                mujoco.mj_setState(mdl, d, state, _FD_SPEC)
                mujoco.mjd_transitionFD(mdl, d, self.eps, self.centered, A[i], B[i], None, None)
                continue
            A_i, B_i = np.eye(n), np.zeros((n, m))
            for j in range(self.substeps):
                state[1 : 1 + n] = starts[i, j]
                mujoco.mj_setState(mdl, d, state, _FD_SPEC)
                mujoco.mjd_transitionFD(mdl, d, self.eps, self.centered, A_j, B_j, None, None)
                A_i, B_i = A_j @ A_i, A_j @ B_i + B_j  # A ← A_j A, B ← A_j B + B_j
            A[i], B[i] = A_i, B_i

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_runner"] = state["_pool"] = None  # thread pools do not copy or pickle
        return state

    def extra_repr(self) -> str:
        return (
            f"n_state={self.n_state}, n_ctrl={self.n_ctrl}, substeps={self.substeps}, "
            f"dt={self.dt:g}, eps={self.eps:g}, centered={self.centered}, nthread={self.nthread}"
        )


def _check_supported(model: mujoco.MjModel) -> None:
    """ValueError for models whose state is not ``[qpos; qvel]`` in plain coordinates."""
    kinds = sorted({_UNSUPPORTED_JOINTS[int(t)] for t in model.jnt_type
                    if int(t) in _UNSUPPORTED_JOINTS})
    if kinds or model.nq != model.nv:
        raise ValueError(
            f"model has {' and '.join(kinds) or 'quaternion'} joints (nq={model.nq}, "
            f"nv={model.nv}): MujocoDynamics supports hinge and slide joints only so far "
            f"(a tangent-space state for free and ball joints is not supported yet)"
        )
    if model.na > 0:
        raise ValueError(
            f"model has actuator activations (na={model.na}): MujocoDynamics does not "
            f"support activation states yet; use actuators without dynamics (dyntype none)"
        )
    if model.nu == 0:
        raise ValueError("model has no actuators (nu=0): MujocoDynamics needs a control")
    full = mujoco.mj_stateSize(model, int(mujoco.mjtState.mjSTATE_FULLPHYSICS))
    if full != 1 + model.nq + model.nv:
        raise ValueError(
            f"model carries plugin state ({full - 1 - model.nq - model.nv} numbers): "
            f"MujocoDynamics supports states [qpos; qvel] only"
        )


def _control_limits(model: mujoco.MjModel) -> tuple[np.ndarray, np.ndarray]:
    """``(lower (m,), upper (m,))``: ``ctrlrange`` where MuJoCo clamps the control, ±inf
    elsewhere (not limited, or clamping disabled by ``mjDSBL_CLAMPCTRL``)."""
    limited = model.actuator_ctrllimited.astype(bool)
    if model.opt.disableflags & int(mujoco.mjtDisableBit.mjDSBL_CLAMPCTRL):
        limited[:] = False
    lower = np.where(limited, model.actuator_ctrlrange[:, 0], -np.inf)
    upper = np.where(limited, model.actuator_ctrlrange[:, 1], np.inf)
    return lower, upper


def _bad_inputs(x: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Rows ``(N,)`` that MuJoCo's own checks would reject (NaN, ±inf, ``|v| > mjMAXVAL``);
    written ``~(a <= b)`` so that NaN counts as bad."""
    return ~(np.maximum(np.abs(x).max(-1, initial=0.0), np.abs(u).max(-1, initial=0.0))
             <= _MAXVAL)


def _to_numpy(t: Tensor) -> np.ndarray:
    """A float64, C-contiguous CPU copy-or-view of ``t`` for MuJoCo."""
    return np.ascontiguousarray(t.detach().to("cpu", torch.float64).numpy())


def _to_torch(a: np.ndarray, like: Tensor) -> Tensor:
    return torch.from_numpy(a).to(device=like.device, dtype=like.dtype)
