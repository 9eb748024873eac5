"""Train the d3rlpy peer (TD3+BC or IQL) on a dataset file and export its policy.

The offline-to-online learners in ``diffto.learning`` are compared with d3rlpy 2.8.1 trained
on the same transitions for the same number of gradient steps. d3rlpy pins gymnasium==1.0.0
(and the old ``gym``), which diffto cannot take, so this script runs in its own virtual
environment, made by ``setup_venv.sh`` beside it, and never imports diffto. The two sides meet
only through files: the project writes ``DATA.npz``; this script writes ``policy.pt`` (a
TorchScript policy that any torch can load, no d3rlpy needed) and ``result.json``.

Run::

    bash benchmarks/d3rlpy_peer/setup_venv.sh           # once; idempotent
    benchmarks/d3rlpy_peer/.venv/bin/python benchmarks/d3rlpy_peer/train_d3rlpy.py \\
        --dataset DATA.npz --algo td3bc --steps 100000 --seed 0 --out runs/d3rlpy/td3bc_s0 \\
        [--batch-size 256] [--hparams '{"alpha": 2.5}' | --hparams overrides.json] [--progress]

Input, ``DATA.npz`` (float32; the row index is time, episodes back to back):

- ``observations (N, d)``: the learner's input, the state and the goal concatenated;
- ``actions (N, a)`` in [-1, 1];
- ``rewards (N,)``;
- ``terminals (N,)`` and ``timeouts (N,)``, 0/1, never both 1 on one row; the last row of every
  episode has one of them set, and so must the last row of the file.

d3rlpy stores episodes, not (s, a, r, s') tuples: the next observation of row i is row i + 1 of
the same episode. A row with ``terminals = 1`` is a true end (its target has no bootstrap and
its next observation is never read). A row with ``timeouts = 1`` has no next observation in
the file, so d3rlpy does not train on it: an episode of length L that ends by time limit gives
L - 1 transitions, one ending in a terminal gives L. ``result.json`` records how many rows were
trained on. A learner that stores explicit next observations trains on one more transition per
timed-out episode; with episodes of tens of steps the difference is a few per cent of the data.

Training follows d3rlpy's own defaults, which follow the papers, and its reproduction scripts:

- ``td3bc``: ``TD3PlusBCConfig`` defaults (alpha 2.5, policy noise 0.2 clipped at 0.5, actor
  updated every 2nd step, lr 3e-4 both, gamma 0.99, tau 0.005, two critics) and the
  ``StandardObservationScaler`` (mean and std of the dataset's observations), as d3rlpy's
  TD3+BC example uses; no reward scaler.
- ``iql``: ``IQLConfig`` defaults (expectile 0.7, weight_temp 3.0, max_weight 100, lr 3e-4,
  gamma 0.99, tau 0.005, two critics), the actor's learning rate on a cosine schedule over the
  whole run (T_max = --steps) and ``ReturnBasedRewardScaler(multiplier=1000)`` (rewards times
  1000 / (largest - smallest episode return)), as d3rlpy's IQL example for locomotion does; no
  observation scaler. The example for sparse-reward AntMaze uses
  ``ConstantShiftRewardScaler(-1)`` instead: ``--hparams '{"reward_scaler": "shift"}'``.
  When every episode has the same return the return-based scaler would divide by zero; the
  script then stops with an error naming the alternatives. With sparse 0/1 goal rewards the
  returns span [0, 1] and the return-based scaler multiplies rewards by 1000 (Q-losses in the
  tens of thousands); the script prints a note when the factor is 100 or more. Which scaler
  fits a goal-reaching task is the caller's choice, recorded in ``result.json``.
- Both: networks of 256-256 ReLU hidden units (d3rlpy's default encoder), batch 256, uniform
  sampling over transitions, CPU, one torch thread, no evaluator, no logs written anywhere
  (``NoopAdapterFactory``); ``d3rlpy.seed(S)`` seeds Python, NumPy and torch.

``--hparams`` takes a JSON object (inline or a file path). Keys: any field of the chosen
config named above (``alpha``, ``expectile``, ``gamma``, ``actor_learning_rate``, ...) and
``hidden_units`` (list of ints), ``observation_scaler`` (``standard`` | ``none``),
``reward_scaler`` (``return`` | ``shift`` | ``none``), ``reward_multiplier`` (for ``return``),
``reward_shift`` (for ``shift``), ``actor_lr_schedule`` (``cosine`` | ``none``). An unknown
key is an error that lists the valid ones.

Exactly --steps gradient steps: d3rlpy runs ``n_steps // n_steps_per_epoch`` epochs, so the
epoch length is chosen as a divisor of --steps (the largest one from 1,000 to 10,000, else a
single epoch), and the step count is checked by a callback. The per-epoch mean losses go into
``result.json``.

Output, in ``OUTDIR`` (each file written under a temporary name and renamed into place):

- ``policy.pt``: the deterministic policy, ``algo.save_policy``. Convention, checked after
  every run against ``algo.predict`` on up to 256 dataset rows and on batches of 1 and 7:
  input a float32 tensor (B, d) of RAW observations (the observation scaler, when one is
  used, is inside the traced graph: the script also checks that the bare actor network on
  raw observations gives different actions), output float32 (B, a), tanh-squashed, in
  [-1, 1]. IQL's exported action is tanh of the Gaussian policy's mean. A float64 input
  raises. Tracing prints a TracerWarning about the scaler's shape assertion, which the
  trace turns into a constant; the batch-size checks above show the export holds for any B.
- ``result.json``: algo, steps, seed, batch size, every hyperparameter (the script's choices
  and d3rlpy's full serialized config, fitted scalers included), dataset counts, the fit's
  wall and CPU seconds (fit only: not loading, not export), seconds per 1,000 updates,
  d3rlpy/torch/numpy/gymnasium versions, per-epoch losses and timings and the TorchScript
  check.

d3rlpy prints its own structured log lines (dataset info, parameters, one line per epoch) and
old ``gym`` prints a deprecation notice on import; the script's own last line sums up the run.
Exit status 2 means a bad dataset (the message names the array and the shapes) or bad
arguments.

Running d3rlpy inside the project's own .venv with ``pip install --no-deps`` (checked in a
throw-away venv holding the project's gymnasium 1.4.0, torch 2.13.0+cpu, numpy 2.4.6,
``d3rlpy==2.8.1 --no-deps`` and then d3rlpy's other requirements): it works at run time, but
it is not clean. ``import d3rlpy`` fails ("No module named 'gym'") until the unmaintained
``gym`` 0.26.2 is installed too, because d3rlpy imports ``gym.spaces`` at import time; with
gym, h5py, structlog, colorama, dataclasses-json and scikit-learn added (with their own
dependencies; none of the six is in the project's .venv), d3rlpy's import-time health check
accepts gymnasium 1.4.0 (it only asks for >= 1.0.0) and this script trains and exports both
algorithms with every check passing. ``pip check`` then fails with "d3rlpy 2.8.1 has
requirement gymnasium==1.0.0, but you have gymnasium 1.4.0", pip prints the conflict after
every later install, and installing or upgrading d3rlpy without ``--no-deps`` would downgrade
gymnasium under the project. The shipped route is therefore the separate venv of
``setup_venv.sh``; the project's pyproject.toml and setup.sh never name d3rlpy.

Cost on the development machine (2 shared CPU cores, one torch thread, torch 2.13.0+cpu,
batch 256, d = 17, a = 7, 2,000 steps per run, two runs each; other jobs loaded the machine
(load average 2-6), so CPU time is the figure to compare):

=====  =======================  ========================  =================================
algo   CPU s per 1,000 updates  wall s per 1,000 updates  of a step: batch sampling, update
=====  =======================  ========================  =================================
td3bc  23.5, 23.7               32.5, 46.2                6.5 ms, 25 ms
iql    30.6, 34.3               35.2, 65.4                5.4 ms, 28 ms
=====  =======================  ========================  =================================

For scale: a plain torch loop with the same networks and the same TD3+BC update took 12.2 CPU
s per 1,000 updates on that machine; d3rlpy's per-transition batch sampling in Python and its
bookkeeping about double that. Building the models adds about 3 s before the first step (not
in the figures above).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NoReturn

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np  # noqa: E402

REQUIRED = ("observations", "actions", "rewards", "terminals", "timeouts")

# Keys that this script interprets itself; every other --hparams key must be a config field.
SCRIPT_KEYS = {
    "hidden_units",
    "observation_scaler",
    "reward_scaler",
    "reward_multiplier",
    "reward_shift",
    "actor_lr_schedule",
}
SCRIPT_DEFAULTS = {
    "td3bc": {
        "hidden_units": [256, 256],
        "observation_scaler": "standard",
        "reward_scaler": "none",
        "reward_multiplier": 1000.0,
        "reward_shift": -1.0,
        "actor_lr_schedule": "none",
    },
    "iql": {
        "hidden_units": [256, 256],
        "observation_scaler": "none",
        "reward_scaler": "return",
        "reward_multiplier": 1000.0,
        "reward_shift": -1.0,
        "actor_lr_schedule": "cosine",
    },
}
CHOICES = {
    "observation_scaler": ("standard", "none"),
    "reward_scaler": ("return", "shift", "none"),
    "actor_lr_schedule": ("cosine", "none"),
}
# Config fields that --hparams may set (plain numbers; factories and scalers are set through
# the script keys above, batch size through --batch-size).
CONFIG_FIELDS = {
    "td3bc": (
        "actor_learning_rate",
        "critic_learning_rate",
        "gamma",
        "tau",
        "n_critics",
        "target_smoothing_sigma",
        "target_smoothing_clip",
        "alpha",
        "update_actor_interval",
    ),
    "iql": (
        "actor_learning_rate",
        "critic_learning_rate",
        "gamma",
        "tau",
        "n_critics",
        "expectile",
        "weight_temp",
        "max_weight",
    ),
}


HP = "train_d3rlpy: --hparams: "


def _hp_fail(msg: str) -> NoReturn:
    print(HP + msg, file=sys.stderr)
    raise SystemExit(2)


class DatasetError(ValueError):
    """The dataset file is missing an array or its arrays do not fit together."""


def load_dataset(path: Path) -> dict[str, np.ndarray]:
    """Read and check ``path``; return float32 arrays, rewards/terminals/timeouts 1-D."""
    if not path.is_file():
        raise DatasetError(f"{path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as npz:
            present = set(npz.files)
            missing = [k for k in REQUIRED if k not in present]
            if missing:
                raise DatasetError(
                    f"{path}: missing array(s) {', '.join(missing)}; "
                    f"the file holds {sorted(present)}, needs {list(REQUIRED)}"
                )
            raw = {k: npz[k] for k in REQUIRED}
    except DatasetError:
        raise
    except Exception as exc:  # zip/format errors, pickled object arrays
        raise DatasetError(f"{path}: not a readable .npz file of plain arrays ({exc})") from exc

    for k, v in raw.items():
        if not (
            np.issubdtype(v.dtype, np.floating)
            or np.issubdtype(v.dtype, np.integer)
            or v.dtype == np.bool_
        ):
            raise DatasetError(f"{k}: dtype {v.dtype} is not numeric")

    obs, act = raw["observations"], raw["actions"]
    if obs.ndim != 2:
        raise DatasetError(f"observations: shape {obs.shape}, expected (N, d)")
    if act.ndim != 2:
        raise DatasetError(f"actions: shape {act.shape}, expected (N, a) with N = {obs.shape[0]}")
    n = obs.shape[0]
    if n == 0:
        raise DatasetError("observations: the dataset has no rows")
    if act.shape[0] != n:
        raise DatasetError(
            f"actions: shape {act.shape} does not match observations {obs.shape} "
            f"(expected ({n}, a))"
        )
    out = {"observations": obs.astype(np.float32), "actions": act.astype(np.float32)}
    for k in ("rewards", "terminals", "timeouts"):
        v = raw[k]
        if v.ndim == 2 and v.shape[1] == 1:
            v = v[:, 0]
        if v.shape != (n,):
            raise DatasetError(
                f"{k}: shape {raw[k].shape} does not match observations "
                f"{obs.shape} (expected ({n},))"
            )
        out[k] = v.astype(np.float32)

    for k in ("observations", "actions", "rewards"):
        bad = ~np.isfinite(out[k])
        if bad.any():
            row = int(np.argwhere(bad)[0][0])
            raise DatasetError(f"{k}: {int(bad.sum())} non-finite value(s), first in row {row}")
    lo, hi = float(out["actions"].min()), float(out["actions"].max())
    if lo < -1.0 - 1e-6 or hi > 1.0 + 1e-6:
        raise DatasetError(f"actions: values in [{lo:.4g}, {hi:.4g}], expected within [-1, 1]")
    for k in ("terminals", "timeouts"):
        vals = np.unique(out[k])
        if not np.isin(vals, (0.0, 1.0)).all():
            raise DatasetError(f"{k}: values {vals[:10].tolist()}, expected only 0 and 1")
    both = (out["terminals"] > 0) & (out["timeouts"] > 0)
    if both.any():
        raise DatasetError(
            f"terminals and timeouts: both 1 on {int(both.sum())} row(s), first "
            f"row {int(np.argmax(both))}; an episode ends either way, not both"
        )
    if out["terminals"][-1] == 0 and out["timeouts"][-1] == 0:
        raise DatasetError(
            f"terminals/timeouts: the last row ({n - 1}) ends no episode; "
            "the last transition of every episode needs terminal or timeout = 1"
        )
    return out


def episode_counts(data: dict[str, np.ndarray]) -> dict[str, int]:
    """Rows, episodes and the transitions d3rlpy trains on (see the module docstring)."""
    ends = np.flatnonzero((data["terminals"] > 0) | (data["timeouts"] > 0))
    lengths = np.diff(np.concatenate([[-1], ends]))
    terminated = data["terminals"][ends] > 0
    used = int(lengths.sum() - (~terminated).sum())
    return {
        "rows": int(data["observations"].shape[0]),
        "episodes": int(len(ends)),
        "episodes_terminal": int(terminated.sum()),
        "episodes_timeout": int((~terminated).sum()),
        "episode_length_min": int(lengths.min()),
        "episode_length_max": int(lengths.max()),
        "transitions_trained_on": used,
        "obs_dim": int(data["observations"].shape[1]),
        "action_dim": int(data["actions"].shape[1]),
    }


def resolve_hparams(
    algo: str, text: str | None
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Split the --hparams overrides into (script choices, config fields, overrides)."""
    overrides: dict[str, Any] = {}
    if text:
        try:
            src = Path(text).read_text() if Path(text).is_file() else text
            overrides = json.loads(src)
        except (OSError, json.JSONDecodeError) as exc:
            _hp_fail(f"not a JSON object or a readable JSON file ({exc})")
        if not isinstance(overrides, dict):
            _hp_fail(f"expected a JSON object, got {type(overrides).__name__}")
    script = dict(SCRIPT_DEFAULTS[algo])
    config: dict[str, Any] = {}
    valid = sorted(SCRIPT_KEYS | set(CONFIG_FIELDS[algo]))
    for k, v in overrides.items():
        if k in SCRIPT_KEYS:
            script[k] = v
        elif k in CONFIG_FIELDS[algo]:
            config[k] = v
        else:
            _hp_fail(f"unknown key {k!r} for {algo}; valid keys: {valid}")
    for k, allowed in CHOICES.items():
        if script[k] not in allowed:
            _hp_fail(f"{k}={script[k]!r}, expected one of {list(allowed)}")
    hu = script["hidden_units"]
    if not (isinstance(hu, list) and hu and all(isinstance(h, int) and h > 0 for h in hu)):
        _hp_fail(f"hidden_units={hu!r}, expected a list of positive ints")
    return script, config, overrides


def epoch_length(steps: int) -> int:
    """A divisor of ``steps`` so that d3rlpy's epochs add up to exactly ``steps``."""
    for d in range(min(steps, 10_000), 999, -1):
        if steps % d == 0:
            return d
    return steps


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _umask_mode())  # mkstemp makes 0600 files
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", type=Path, required=True, help="DATA.npz")
    p.add_argument("--algo", choices=("td3bc", "iql"), required=True)
    p.add_argument("--steps", type=int, required=True, help="gradient steps")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--hparams", default=None, help="JSON object or path to a JSON file")
    p.add_argument("--progress", action="store_true", help="show d3rlpy's progress bar")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error("--steps must be at least 1")
    if args.batch_size < 1:
        p.error("--batch-size must be at least 1")

    script_hp, config_hp, overrides = resolve_hparams(args.algo, args.hparams)
    try:
        data = load_dataset(args.dataset)
    except DatasetError as exc:
        print(f"train_d3rlpy: bad dataset: {exc}", file=sys.stderr)
        return 2
    counts = episode_counts(data)
    if counts["transitions_trained_on"] == 0:
        print(
            "train_d3rlpy: bad dataset: every episode is a single timed-out row, so there is "
            "no transition with a next observation",
            file=sys.stderr,
        )
        return 2

    import torch

    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass  # already set in this process
    import d3rlpy
    from d3rlpy.logging import NoopAdapterFactory

    if script_hp["reward_scaler"] == "return":
        ends = np.flatnonzero((data["terminals"] > 0) | (data["timeouts"] > 0))
        # Returns as d3rlpy's scaler computes them: a timed-out episode's last row is not a
        # transition, so its reward is left out.
        rets, start = [], 0
        for e in ends:
            last = e + 1 if data["terminals"][e] > 0 else e
            rets.append(float(data["rewards"][start:last].sum()))
            start = e + 1
        if max(rets) - min(rets) <= 0.0:
            print(
                "train_d3rlpy: bad dataset for reward_scaler=return: every episode has the "
                f"return {rets[0]:.6g}, so the scale 1000 / (max - min) is undefined; pass "
                '--hparams \'{"reward_scaler": "shift"}\' or \'{"reward_scaler": "none"}\'',
                file=sys.stderr,
            )
            return 2
        scale = float(script_hp["reward_multiplier"]) / (max(rets) - min(rets))
        if scale >= 100.0:
            print(
                f"train_d3rlpy: note: reward_scaler=return multiplies rewards by {scale:.4g} "
                f"(episode returns span [{min(rets):.4g}, {max(rets):.4g}]); d3rlpy's IQL "
                "example for sparse goal-reaching rewards (AntMaze) uses "
                '--hparams \'{"reward_scaler": "shift"}\' instead',
                file=sys.stderr,
            )

    args.out.mkdir(parents=True, exist_ok=True)
    d3rlpy.seed(args.seed)

    dataset = d3rlpy.dataset.MDPDataset(
        observations=data["observations"],
        actions=data["actions"],
        rewards=data["rewards"],
        terminals=data["terminals"],
        timeouts=data["timeouts"],
        action_space=d3rlpy.ActionSpace.CONTINUOUS,
        action_size=counts["action_dim"],
    )

    encoder = d3rlpy.models.VectorEncoderFactory(hidden_units=list(script_hp["hidden_units"]))
    kwargs: dict[str, Any] = dict(config_hp)
    kwargs["batch_size"] = args.batch_size
    kwargs["actor_encoder_factory"] = encoder
    kwargs["critic_encoder_factory"] = encoder
    if script_hp["observation_scaler"] == "standard":
        kwargs["observation_scaler"] = d3rlpy.preprocessing.StandardObservationScaler()
    if script_hp["reward_scaler"] == "return":
        kwargs["reward_scaler"] = d3rlpy.preprocessing.ReturnBasedRewardScaler(
            multiplier=float(script_hp["reward_multiplier"])
        )
    elif script_hp["reward_scaler"] == "shift":
        kwargs["reward_scaler"] = d3rlpy.preprocessing.ConstantShiftRewardScaler(
            shift=float(script_hp["reward_shift"])
        )
    if script_hp["actor_lr_schedule"] == "cosine":
        kwargs["actor_optim_factory"] = d3rlpy.optimizers.AdamFactory(
            lr_scheduler_factory=d3rlpy.optimizers.CosineAnnealingLRFactory(T_max=args.steps)
        )
    if args.algo == "td3bc":
        config = d3rlpy.algos.TD3PlusBCConfig(**kwargs)
    else:
        kwargs["value_encoder_factory"] = encoder
        config = d3rlpy.algos.IQLConfig(**kwargs)
    algo = config.create(device="cpu:0")

    per_epoch = epoch_length(args.steps)
    step_count = [0]

    def count_step(_algo: Any, _epoch: int, _total: int) -> None:
        step_count[0] += 1

    t_wall, t_cpu = time.perf_counter(), time.process_time()
    history = algo.fit(
        dataset,
        n_steps=args.steps,
        n_steps_per_epoch=per_epoch,
        experiment_name=f"{args.algo}_seed{args.seed}",
        with_timestamp=False,
        logger_adapter=NoopAdapterFactory(),
        show_progress=args.progress,
        save_interval=10**9,
        evaluators=None,
        callback=count_step,
    )
    fit_wall = time.perf_counter() - t_wall
    fit_cpu = time.process_time() - t_cpu
    if step_count[0] != args.steps:
        raise RuntimeError(f"d3rlpy ran {step_count[0]} gradient steps, not {args.steps}")
    # After fit: d3rlpy cannot serialize a scaler before it has been fitted to the data.
    config_serialized = json.loads(algo.config.serialize())

    # Export, then check the TorchScript file against algo.predict.
    fd, tmp_name = tempfile.mkstemp(prefix=".policy.", suffix=".pt", dir=args.out)
    os.close(fd)
    try:
        algo.save_policy(tmp_name)
        ts = torch.jit.load(tmp_name, map_location="cpu")
        check = verify_policy(algo, ts, data["observations"], counts["action_dim"], torch)
        os.chmod(tmp_name, _umask_mode())
        os.replace(tmp_name, args.out / "policy.pt")
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)

    import gymnasium

    result = {
        "algo": args.algo,
        "d3rlpy_class": type(algo).__name__,
        "steps": args.steps,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "n_steps_per_epoch": per_epoch,
        "hyperparameters": used_hparams(args.algo, config, script_hp, args.steps),
        "hparams_overrides": overrides,
        "d3rlpy_config": config_serialized,
        "dataset": {"path": str(args.dataset.resolve()), **counts},
        "fit_wall_s": fit_wall,
        "fit_cpu_s": fit_cpu,
        "wall_s_per_1000_updates": fit_wall / args.steps * 1000.0,
        "cpu_s_per_1000_updates": fit_cpu / args.steps * 1000.0,
        "torch_threads": torch.get_num_threads(),
        "device": "cpu",
        "versions": {
            "d3rlpy": d3rlpy.__version__,
            "torch": torch.__version__,
            "numpy": np.__version__,
            "gymnasium": gymnasium.__version__,
            "python": sys.version.split()[0],
        },
        "epochs": [{"epoch": int(e), **{k: float(v) for k, v in m.items()}} for e, m in history],
        "policy": {"file": "policy.pt", **check},
    }
    write_atomic(args.out / "result.json", json.dumps(result, indent=2, default=_jsonable) + "\n")
    print(
        f"train_d3rlpy: {args.algo} seed {args.seed}: {args.steps} steps in {fit_wall:.1f} s "
        f"wall / {fit_cpu:.1f} s CPU ({result['cpu_s_per_1000_updates']:.2f} CPU s per 1,000 "
        f"updates); TorchScript max |diff| vs predict {check['max_abs_diff_vs_predict']:.2e}; "
        f"wrote {args.out / 'policy.pt'} and {args.out / 'result.json'}"
    )
    return 0


def used_hparams(algo: str, config: Any, script_hp: dict[str, Any], steps: int) -> dict:
    """The hyperparameters in force, without the script options that were left unused."""
    hp = {k: getattr(config, k) for k in CONFIG_FIELDS[algo]}
    hp["batch_size"] = config.batch_size
    hp["hidden_units"] = list(script_hp["hidden_units"])
    hp["observation_scaler"] = script_hp["observation_scaler"]
    hp["reward_scaler"] = script_hp["reward_scaler"]
    if script_hp["reward_scaler"] == "return":
        hp["reward_multiplier"] = float(script_hp["reward_multiplier"])
        rs = config.reward_scaler
        hp["reward_return_range"] = [rs.return_min, rs.return_max]
    elif script_hp["reward_scaler"] == "shift":
        hp["reward_shift"] = float(script_hp["reward_shift"])
    hp["actor_lr_schedule"] = script_hp["actor_lr_schedule"]
    if script_hp["actor_lr_schedule"] == "cosine":
        hp["actor_lr_cosine_T_max"] = steps
    return hp


def _jsonable(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON serializable: {type(x).__name__}")


def verify_policy(
    algo: Any, ts: Any, observations: np.ndarray, action_dim: int, torch: Any
) -> dict[str, Any]:
    """Check the TorchScript policy's convention; raise if it does not hold."""
    n = observations.shape[0]
    idx = np.linspace(0, n - 1, num=min(n, 256)).round().astype(int)
    x = observations[idx]
    expected = algo.predict(x)
    with torch.no_grad():
        got = ts(torch.from_numpy(x)).numpy()
        single = ts(torch.from_numpy(x[:1])).numpy()
        seven = ts(torch.from_numpy(x[:7])).numpy()
        # The bare actor on raw observations: differs from the export iff the export scales.
        bare = algo.impl.predict_best_action(torch.from_numpy(x)).numpy()
    if got.shape != (len(idx), action_dim) or got.dtype != np.float32:
        raise RuntimeError(
            f"TorchScript output {got.shape} {got.dtype}, expected "
            f"({len(idx)}, {action_dim}) float32"
        )
    diff = float(np.abs(got - expected).max())
    diff_batches = max(float(np.abs(single - got[:1]).max()), float(np.abs(seven - got[:7]).max()))
    if diff > 1e-5 or diff_batches > 1e-5:
        raise RuntimeError(
            f"TorchScript policy disagrees with algo.predict: max |diff| {diff:.3g}"
            f" (batch of 1 / 7 vs full: {diff_batches:.3g})"
        )
    if np.abs(got).max() > 1.0:
        raise RuntimeError(f"TorchScript actions leave [-1, 1]: max |a| {np.abs(got).max():.4g}")
    has_scaler = algo.config.observation_scaler is not None
    diff_bare = float(np.abs(got - bare).max())
    if has_scaler and diff_bare < 1e-6:
        raise RuntimeError(
            "TorchScript policy equals the bare actor on raw observations: the "
            "observation scaler is not part of the export"
        )
    return {
        "input": "float32 tensor (B, d), raw observations (state and goal concatenated); any B",
        "output": "float32 tensor (B, a), deterministic (tanh-squashed) action in [-1, 1]",
        "observation_scaler_in_export": has_scaler,
        "observation_scaler": type(algo.config.observation_scaler).__name__ if has_scaler else None,
        "checked_rows": int(len(idx)),
        "max_abs_diff_vs_predict": diff,
        "max_abs_diff_batch_1_and_7": diff_batches,
        "max_abs_diff_vs_bare_actor_on_raw": diff_bare,
        "max_abs_action": float(np.abs(got).max()),
    }


if __name__ == "__main__":
    sys.exit(main())
