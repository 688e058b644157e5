"""Training throughput over processes and threads: one HAPPO run under torchrun against one process.

Each configuration trains the same total number of env steps (all ranks together) from scratch, one after the
other in this one invocation, so that the machine's speed that hour falls on all of them; the figure is the
trainer's own env-steps/s at its last iteration (start-up excluded). `--num-envs` is per process, so N processes
step N x 512 envs at the defaults.

    python benchmarks/scaling.py                                  # CPU: 1 process x 2 threads, 1 x 1, 2 x 1
    python benchmarks/scaling.py --gpus 1 2 4 8                   # a GPU machine: N processes, one GPU each, nccl
    python benchmarks/scaling.py --gpus 1 2 4 8 -- --num-envs 4096
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from typing import List, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "happo_mapush.py")


def train_sps(processes: int, threads: int, flags: List[str], env_steps: int) -> float:
    """The env-steps/s of all processes together that the trainer reports at its last iteration."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    command = (launcher if processes > 1 else [sys.executable]) + [
        SCRIPT, "--total-timesteps", str(env_steps), "--save-interval", "1000000", "--log-interval", "1", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    result = subprocess.run(command, cwd=tempfile.mkdtemp(), capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
    return float(re.findall(r" SPS (\d+) ", result.stdout)[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, nargs="+", help="GPU counts to measure (one process per GPU)")
    parser.add_argument("--iterations", type=int, default=20, help="iterations of a single process at the defaults")
    parser.add_argument("trainer_flags", nargs=argparse.REMAINDER, help="after `--`: flags for every run")
    args = parser.parse_args()
    flags = [f for f in args.trainer_flags if f != "--"]
    num_envs = int(flags[flags.index("--num-envs") + 1]) if "--num-envs" in flags else 512
    env_steps = args.iterations * num_envs * 20 * 5
    if args.gpus:
        configs: List[Tuple[int, int]] = [(g, 1) for g in args.gpus]
        flags = ["--cuda", *flags]
    else:
        cores = os.cpu_count() or 2
        configs = [(1, cores), (1, 1), (cores, 1)]
        flags = ["--no-cuda", *flags]
    print(f"{env_steps:,} env steps per configuration, flags: {' '.join(flags)}")
    print("| processes | threads each | env-steps/s | vs 1 process x 1 thread |\n|---|---|---|---|")
    results = [(p, t, train_sps(p, t, flags, env_steps)) for p, t in configs]
    base = next((sps for p, t, sps in results if p == 1 and t == 1), results[0][2])
    for p, t, sps in results:
        print(f"| {p} | {t} | {sps:,.0f} | {sps / base:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
