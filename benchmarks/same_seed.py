"""Does a change keep learning bit for bit? The same seed and flags through this checkout and another one.

Trains a short run with each checkout's happo_mapush.py (one torch thread, in a temporary folder) and compares the
final checkpoints: the actors, the critic, every optimizer's state, ValueNorm, the RNG state and every body of the
envs. A refactor that keeps every random stream and every floating-point operation prints `bit-identical` for
every variant; then the tables measured before it hold for it. The same machine, torch build and thread count are
needed (a run is bit-identical only there).

    git worktree add --detach /tmp/before COMMIT                     # the code before the change
    python benchmarks/same_seed.py /tmp/before                       # the default at full size, 3 iterations
    python benchmarks/same_seed.py /tmp/before --tiny --variant= --variant="--share-actor" \
        --variant="--share-actor --no-sequential" --variant="--task cylinder --value-norm-update per-minibatch"
"""
from __future__ import annotations

import argparse
import glob
import os
import shlex
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from checkpoint_tensors import learned_state, same  # noqa: E402

TINY = ["--num-envs", "8", "--num-steps", "16", "--hidden-sizes", "16", "16", "--critic-hidden-sizes", "16", "16",
        "--actor-num-minibatches", "2", "--critic-num-minibatches", "4", "--total-timesteps", "3840"]  # 6 iterations


def final_checkpoint(checkout: str, flags: list) -> dict:
    cwd = tempfile.mkdtemp()
    command = [sys.executable, os.path.join(checkout, "happo_mapush.py"), "--no-cuda", "--save-interval", "1000000",
               *flags]
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
    (path,) = glob.glob(os.path.join(cwd, "runs", "*", "checkpoint_*.pt"))
    return torch.load(path, weights_only=True)


def env_bodies(checkpoint: dict) -> list:
    return [t for own in checkpoint["ranks"] for body in own["env"]["bodies"].values() for t in body]


def differences(a: dict, b: dict) -> list:
    found = [] if same(learned_state(a), learned_state(b)) else ["networks, optimizers or ValueNorm"]
    if not all(torch.equal(x["rng"]["torch"], y["rng"]["torch"]) for x, y in zip(a["ranks"], b["ranks"])):
        found.append("the RNG state")
    if not all(torch.equal(x, y) for x, y in zip(env_bodies(a), env_bodies(b))):
        found.append("the envs")
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("other", help="the other checkout (a git worktree of an earlier commit)")
    parser.add_argument("--variant", action="append", help='a variant\'s flags as one string, --variant="--flag value" '
                        "(repeat it; default: the default flags only)")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes, 6 iterations (else the defaults, 3)")
    args = parser.parse_args()
    size = TINY if args.tiny else ["--total-timesteps", str(3 * 512 * 20 * 5)]
    failed = 0
    for variant in args.variant or [""]:
        flags = size + shlex.split(variant)
        found = differences(final_checkpoint(ROOT, flags), final_checkpoint(args.other, flags))
        print(f"{variant or 'the default'}: {'bit-identical' if not found else 'DIFFERENT: ' + ', '.join(found)}",
              flush=True)
        failed += bool(found)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
