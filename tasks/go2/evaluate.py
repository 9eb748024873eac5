"""Evaluate a Go2 tracking policy against its reference and the open-loop baseline.

``python -m diffto.tasks.go2.evaluate --checkpoint runs/go2_tracking/checkpoints/last.ckpt``
rolls the policy out deterministically (no domain randomization, from phase 0, early
termination off), plays the same reference open loop (inverse-dynamics torques, no
feedback), and reports RMS tracking errors over the clip:

- position: ``‖p_base − p_ref‖`` (m);
- orientation: rotation angle between base and reference orientation ``2 asin ‖vec(q_ref⁻¹ ⊗ q)‖``
  (degrees);
- joints: RMS over the 12 joints of ``q − q_ref`` (rad).

It writes a tracking-error plot (PNG) and, where MuJoCo can render, a rollout video (MP4),
both atomically (temporary file + ``os.replace``). The video shows the reference pose of each
frame's phase as a translucent light-blue ghost of the robot; the camera follows the robot, so
the ghost's offset from it is the tracking error (``render_ghost_alpha`` in the env kwargs, 0
for none). :class:`Go2TrackingReport` is the
Lightning callback that does this at every validation (plot) and at the end of fit (plot and
video), into the run's log directory.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from lightning.pytorch import Callback, LightningModule, Trainer

from diffto.tasks.go2.rollout import (
    execute_open_loop_rollout,
    execute_policy_rollout,
    load_policy,
    resolve_reference,
)
from diffto.tasks.go2.tracking_errors import TrackingErrors, tracking_errors
from diffto.tasks.go2.tracking_table import (
    format_table,
    save_table,
    tracking_table,
    zero_residual,
)

__all__ = [
    "TrackingErrors",
    "TrackingReport",
    "tracking_errors",
    "evaluate_tracking",
    "Go2TrackingReport",
    "main",
]


@dataclass
class TrackingReport:
    """What :func:`evaluate_tracking` measured and wrote."""

    policy: dict[str, float]
    open_loop: dict[str, float]
    steps_survived: int
    plot: Path | None = None
    video: Path | None = None
    errors: dict[str, TrackingErrors] = field(default_factory=dict, repr=False)

    def summary(self) -> str:
        """A small table: RMS errors of the policy and of the open-loop baseline."""
        rows = [f"{'RMS error':>22}{'position (m)':>14}{'orient (deg)':>14}{'joint (rad)':>14}"]
        for name, e in (("policy (closed loop)", self.policy),
                        ("open loop (inv. dyn.)", self.open_loop)):
            rows.append(f"{name:>22}{e['pos_rmse']:>14.4f}{e['orient_rmse_deg']:>14.2f}"
                        f"{e['joint_rmse_per_joint']:>14.4f}")
        return "\n".join(rows)


def _atomic_path(path: Path) -> Path:
    """A temporary sibling of ``path`` with the same suffix (writers pick formats by it)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    return Path(tmp)


def _publish(tmp: Path, path: Path) -> None:
    """Give the finished temporary file normal permissions (mkstemp makes it 0600), then
    rename it over ``path`` in one step, so readers never see a partial file."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def save_plot(errors: dict[str, TrackingErrors], path: Path, title: str = "") -> Path:
    """Tracking errors over time, one panel per error, one line per rollout (atomic PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(7, 7), sharex=True)
    panels = (("position", "position error (m)"), ("orientation_deg", "orientation error (deg)"),
              ("joint", "joint RMS error (rad)"))
    for ax, (attr, label) in zip(axes, panels, strict=True):
        for name, e in errors.items():
            ax.plot(e.time, getattr(e, attr), label=name)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(loc="upper left")
    axes[-1].set_xlabel("time (s)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _atomic_path(path)
    try:
        fig.savefig(tmp, dpi=100)
        _publish(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path


def save_video(frames: list[np.ndarray], path: Path, fps: int) -> Path:
    """Frames ``(H, W, 3) uint8`` to an H.264 MP4 (atomic)."""
    import imageio.v2 as imageio

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _atomic_path(path)
    try:
        with imageio.get_writer(tmp, fps=fps, macro_block_size=8) as writer:
            for frame in frames:
                writer.append_data(np.asarray(frame))
        _publish(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def evaluate_tracking(
    policy: Any,
    reference: Any,
    out_dir: str | os.PathLike | None = None,
    *,
    name: str = "tracking",
    steps: int | None = None,
    video: bool = True,
    baseline: Literal["inverse_dynamics", "feedforward"] = "inverse_dynamics",
    env_kwargs: dict[str, Any] | None = None,
    seed: int = 0,
    title: str | None = None,
) -> TrackingReport:
    """Roll out ``policy`` and the open-loop baseline on ``reference``; plot and film them.

    Args:
        policy: a trained module with ``act()`` (e.g. PPO) or a callable ``obs -> action``.
        reference: ``ReferenceTrajectory``, ``.npz`` path or motion name.
        out_dir: where ``<name>.png`` and ``<name>.mp4`` go (``None``: write nothing).
        steps: control steps (default: the whole reference).
        video: render the policy rollout (skipped with a warning where rendering fails).
        baseline: open-loop torques, see :func:`execute_open_loop_rollout`.
        env_kwargs: the training env's ``TrackingConfig`` overrides (gains, limits, ...).
        title: plot title (default: ``name``).
    """
    reference = resolve_reference(reference, env_kwargs)
    render = video and out_dir is not None
    qpos, _, _, frames = execute_policy_rollout(
        policy, reference, steps=steps, render=render, seed=seed, env_kwargs=env_kwargs
    )
    qpos_ol, _, _, _ = execute_open_loop_rollout(reference, steps=steps, mode=baseline)
    errors = {"policy": tracking_errors(qpos, reference),
              f"open loop ({baseline})": tracking_errors(qpos_ol, reference)}
    report = TrackingReport(
        policy=errors["policy"].rms(), open_loop=errors[f"open loop ({baseline})"].rms(),
        steps_survived=len(qpos) - 1, errors=errors,
    )
    if out_dir is not None:
        out = Path(out_dir)
        report.plot = save_plot(errors, out / f"{name}.png", title=title or name)
        if render and frames:  # no frames: the rollout has already warned why
            fps = round(1.0 / float(reference.dt))
            report.video = save_video(frames, out / f"{name}.mp4", fps)
    return report


def _reference_and_kwargs(module: LightningModule) -> tuple[Any, dict[str, Any]]:
    """The reference and TrackingConfig overrides the module's eval env was built with."""
    kwargs = dict(getattr(module, "eval_env_kwargs", {}))
    env = getattr(module, "eval_env", None)
    if env is not None and hasattr(env.unwrapped, "reference"):
        reference = env.unwrapped.reference
    else:
        reference = resolve_reference(kwargs.get("reference", "trot"), kwargs)
    return reference, kwargs


class Go2TrackingReport(Callback):
    """Tracking report at validation and at the end of fit: plot, video, RMS errors.

    Prints the RMS tracking errors (position, orientation, joints) of the deterministic policy
    and of the open-loop inverse-dynamics baseline, logs them as ``report/...`` to every
    logger, and writes ``tracking/step_<k>.png`` + ``.mp4`` (validation) and
    ``tracking/final.png`` + ``.mp4`` (fit end) into the run's log directory.

    Args:
        every_n_validations: report at every n-th validation (0: only at fit end).
        video: render the policy rollouts, with the reference as a translucent ghost beside
            the robot (about 65 ms per frame with OSMesa, ~7 s for the 2 s clip); skipped
            with a warning where rendering fails.
        baseline: open-loop torques of the comparison.
        steps: control steps per report rollout (default: the whole reference).
        table_seeds: randomized episodes of the end-of-fit tracking table
            (:mod:`diffto.tasks.go2.tracking_table`, written as ``tracking/table.md`` and
            ``.json``); 0 skips the table.
    """

    def __init__(
        self,
        every_n_validations: int = 1,
        video: bool = True,
        baseline: Literal["inverse_dynamics", "feedforward"] = "inverse_dynamics",
        steps: int | None = None,
        table_seeds: int = 20,
    ) -> None:
        if every_n_validations < 0:
            raise ValueError(f"every_n_validations must be >= 0, got {every_n_validations}")
        if baseline not in ("inverse_dynamics", "feedforward"):
            raise ValueError(f"baseline must be 'inverse_dynamics' or 'feedforward', got "
                             f"{baseline!r}")
        self.every_n_validations = every_n_validations
        self.video = video
        self.baseline = baseline
        self.steps = steps
        if isinstance(table_seeds, bool) or not isinstance(table_seeds, int) or table_seeds < 0:
            raise ValueError(f"table_seeds must be an int >= 0, got {table_seeds!r}")
        self.table_seeds = table_seeds
        self._validations = 0
        self.last_report: TrackingReport | None = None
        self.last_table: list[Any] | None = None

    @staticmethod
    def out_dir(trainer: Trainer) -> Path:
        """``<log_dir>/tracking`` (``default_root_dir`` when no logger is configured)."""
        root = trainer.log_dir if trainer.loggers else None
        return Path(root or trainer.default_root_dir) / "tracking"

    def _report(self, trainer: Trainer, module: LightningModule, name: str, video: bool) -> None:
        # Every rank asks for the folder: under DDP ``trainer.log_dir`` is a broadcast, so a
        # call on rank 0 alone would wait forever for the others.
        out_dir = self.out_dir(trainer)
        if not trainer.is_global_zero:
            return
        reference, kwargs = _reference_and_kwargs(module)
        steps = self.steps
        if trainer.fast_dev_run:  # a smoke test: a few steps show that every piece works
            steps = min(steps or 10, 10, int(reference.num_phases))
        was_training = module.training
        try:
            report = evaluate_tracking(
                load_policy(module), reference, out_dir, name=name,
                steps=steps, video=video, baseline=self.baseline, env_kwargs=kwargs,
                title=f"Go2 tracking, iteration {trainer.global_step} ({name})",
            )
        finally:
            module.train(was_training)
            if getattr(module, "normalizer", None) is not None:
                module.normalizer.frozen = False
        self.last_report = report
        print(f"\nGo2 tracking report ({name}, {report.steps_survived} steps):\n"
              f"{report.summary()}\n  plot: {report.plot}"
              + (f"\n  video: {report.video}" if report.video else ""))
        metrics = {f"report/{k}": v for k, v in report.policy.items()}
        metrics.update({f"report/open_loop_{k}": v for k, v in report.open_loop.items()})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        self._validations += 1
        n = self.every_n_validations
        if n and (self._validations % n == 0 or trainer.fast_dev_run):
            self._report(trainer, pl_module, f"step_{trainer.global_step}", video=self.video)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._report(trainer, pl_module, "final", video=self.video)
        out_dir = self.out_dir(trainer)  # on every rank (a broadcast under DDP)
        if self.table_seeds and trainer.is_global_zero:
            self._table(trainer, pl_module, out_dir)

    def _table(self, trainer: Trainer, module: LightningModule, out_dir: Path) -> None:
        """The tracking table of the run: PD + feedforward alone, the best checkpoint (when
        a checkpoint callback monitors a metric and has saved one), the final policy."""
        reference, kwargs = _reference_and_kwargs(module)
        controllers: dict[str, Any] = {"PD + feedforward alone": zero_residual}
        for callback in trainer.checkpoint_callbacks:
            best = getattr(callback, "best_model_path", "")
            if getattr(callback, "monitor", None) and best and Path(best).is_file():
                controllers[f"best ({Path(best).name})"] = type(module).load_from_checkpoint(
                    best, map_location="cpu")
                break
        controllers[f"final (iteration {trainer.global_step})"] = module
        seeds = 1 if trainer.fast_dev_run else self.table_seeds
        was_training = module.training
        try:
            rows = tracking_table(controllers, reference, seeds=seeds, env_kwargs=kwargs)
        finally:
            module.train(was_training)
        self.last_table = rows
        path = save_table(rows, out_dir)
        print(f"\nGo2 tracking table (nominal clip; {seeds} randomized episodes from phase 0, "
              f"termination on):\n{format_table(rows)}\n  written: {path}")


def _load_trained_module(ckpt: Path):
    """The LightningModule a checkpoint was trained with, found by the class path LightningCLI
    saves among its hyperparameters (so this task module names no learning method)."""
    import importlib

    import torch

    hparams = torch.load(ckpt, map_location="cpu", weights_only=False).get("hyper_parameters", {})
    class_path = hparams.get("_class_path")
    if not isinstance(class_path, str) or "." not in class_path:
        raise ValueError(
            f"--checkpoint {str(ckpt)!r} names no module class (no '_class_path' among its "
            "hyperparameters, as LightningCLI saves): load it with its class's "
            "load_from_checkpoint and call evaluate_tracking"
        )
    module_name, _, class_name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls.load_from_checkpoint(ckpt, map_location="cpu")


def main(argv: list[str] | None = None) -> None:
    """``python -m diffto.tasks.go2.evaluate --checkpoint CKPT [--out DIR] ...``"""
    parser = argparse.ArgumentParser(
        prog="python -m diffto.tasks.go2.evaluate", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--checkpoint", required=True, help="PPO checkpoint (.ckpt)")
    parser.add_argument("--out", default=None,
                        help="output folder (default: <checkpoint dir>/../evaluation)")
    parser.add_argument("--reference", default=None,
                        help="reference: motion name, .npz or folder of raw .npy arrays "
                             "(default: the one trained on)")
    parser.add_argument("--steps", type=int, default=None, help="control steps (default: all)")
    parser.add_argument("--no-video", action="store_true", help="skip the MP4")
    parser.add_argument("--baseline", choices=("inverse_dynamics", "feedforward"),
                        default="inverse_dynamics")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, default=20,
                        help="randomized episodes of the tracking table (PD + feedforward "
                             "alone, best.ckpt and last.ckpt of the checkpoint's folder, the "
                             "checkpoint itself); 0 skips the table")
    args = parser.parse_args(argv)
    if args.seeds < 0:
        parser.error(f"--seeds must be >= 0, got {args.seeds}")
    ckpt = Path(args.checkpoint)
    if not ckpt.is_file():
        parser.error(f"--checkpoint {str(ckpt)!r} does not exist")
    module = _load_trained_module(ckpt)
    kwargs = dict(module.eval_env_kwargs)
    reference = args.reference if args.reference is not None else kwargs.get("reference", "trot")
    reference = resolve_reference(reference, kwargs)
    out = Path(args.out) if args.out else ckpt.resolve().parent.parent / "evaluation"
    report = evaluate_tracking(module, reference, out, name=ckpt.stem, steps=args.steps,
                               video=not args.no_video, baseline=args.baseline,
                               env_kwargs=kwargs, seed=args.seed)
    print(report.summary())
    print(f"plot: {report.plot}")
    if report.video:
        print(f"video: {report.video}")
    if args.seeds:
        controllers: dict[str, Any] = {"PD + feedforward alone": zero_residual}
        for sibling in ("best.ckpt", "last.ckpt"):
            path = ckpt.parent / sibling
            if path.is_file() and path.resolve() != ckpt.resolve():
                controllers[sibling] = _load_trained_module(path)
            elif path.is_file():
                controllers[sibling] = module
        if ckpt.name not in controllers:
            controllers[ckpt.name] = module
        rows = tracking_table(controllers, reference, seeds=args.seeds, env_kwargs=kwargs)
        print(f"\nnominal clip from phase 0; {args.seeds} randomized episodes from phase 0 "
              "(reset seeds 1,000,000 + k), termination on:")
        print(format_table(rows))
        print(f"table: {save_table(rows, out, name=f'{ckpt.stem}_table')}")


if __name__ == "__main__":
    main()
