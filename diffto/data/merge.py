"""Merge trajectory sets on disk: ``python -m diffto.data.merge OUT IN1 IN2 ...``.

Each input is a trajectory ``.npz`` or a folder of shards (read with
:func:`~diffto.data.trajectories.load_trajectories`); the sets must agree on ``meta`` task /
env id and ``dt`` (where both record them), on which arrays they hold and on those arrays'
trailing shapes and dtypes (:func:`~diffto.data.trajectories.check_compatible`). Episode ids
are global, so they must be disjoint across inputs unless ``--renumber`` gives the merged
episodes new ids ``0 .. E-1``.
``OUT`` is written atomically (a crash leaves no partial file) and its ``meta`` is the first
input's, with the counts summed, ``normalization`` recomputed and ``files`` listing the
inputs. A problem exits with status 1 and one line naming the input and the array.

Example::

    python -m diffto.data.merge data/panda_all.npz data/panda_rank0 data/panda_rank1
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm

from diffto.data.trajectories import (
    TrajectorySet,
    load_trajectories,
    merge_trajectories,
    save_trajectories,
)

__all__ = ["main", "merge_files"]


def merge_files(out: str | Path, inputs: Sequence[str | Path], renumber: bool = False,
                compressed: bool = False, overwrite: bool = False,
                progress: bool = True) -> TrajectorySet:
    """Load ``inputs`` (files or shard folders), merge them and write ``out`` atomically.

    Args:
        out: the merged ``.npz`` (``.npz`` appended if missing).
        inputs: at least one trajectory file or folder of shards.
        renumber: renumber episodes ``0 .. E-1`` instead of requiring disjoint ids.
        compressed: write with ``np.savez_compressed``.
        overwrite: replace ``out`` if it exists (otherwise that is an error).
        progress: show a progress bar over the inputs.

    Returns:
        The merged set.
    """
    if not inputs:
        raise ValueError("inputs must name at least one trajectory file or folder")
    out = Path(out)
    if out.suffix != ".npz":
        out = out.with_name(out.name + ".npz")
    if out.exists() and not overwrite:
        raise ValueError(f"out {out} exists: pass --overwrite to replace it")
    paths = [Path(p) for p in inputs]
    # a folder of shards gets its own bar (over its files) below the one over inputs
    sets = [load_trajectories(p, progress=progress and p.is_dir())
            for p in tqdm(paths, desc="reading", unit="input", disable=not progress)]
    merged = merge_trajectories(sets, renumber=renumber, names=[str(p) for p in paths])
    merged.meta["files"] = [str(p) for p in paths]
    save_trajectories(out, merged, compressed=compressed)
    return merged


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m diffto.data.merge",
        description="Merge trajectory sets (.npz files or folders of shards) into one .npz.")
    parser.add_argument("out", help="the merged .npz to write")
    parser.add_argument("inputs", nargs="+", help="trajectory .npz files or shard folders")
    parser.add_argument("--renumber", action="store_true",
                        help="give episodes new ids 0..E-1 instead of requiring disjoint ids")
    parser.add_argument("--compressed", action="store_true", help="write a compressed .npz")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    args = parser.parse_args(argv)
    try:
        merged = merge_files(args.out, args.inputs, renumber=args.renumber,
                             compressed=args.compressed, overwrite=args.overwrite)
    except ValueError as err:
        print(f"merge: {err}", file=sys.stderr)
        return 1
    E = len(merged.episode_ids())
    print(f"merge: wrote {args.out}: {len(merged)} transitions, {E} episodes from "
          f"{len(args.inputs)} inputs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
