"""How fast it runs: the env alone, training in one process, one run over several processes, and the GPU checks.

Every mode prints one markdown table. Configurations that are compared run in this one invocation, alternated over
`--rounds` (medians, min-max), so that the machine's load that hour falls on all of them alike.

    python benchmarks/throughput.py env                       # env-steps/s of the vmas backend, random actions
    python benchmarks/throughput.py train                     # training env-steps/s per CPU second, one process
    python benchmarks/throughput.py train --against /tmp/old  # the same for another checkout (git worktree), alternated
    python benchmarks/throughput.py scaling                   # 1 process x 1 thread against torchrun x cores
    python benchmarks/throughput.py scaling --against /tmp/old  # the same for another checkout, alternated
    python benchmarks/throughput.py scaling --gpus 1 2 4 8    # a GPU machine: one process per GPU, nccl
    python benchmarks/throughput.py gpu                       # the checks that need a GPU (about 5 min); --smoke: CPU

`train` counts CPU seconds (the process's own, summed over its threads), so a loaded machine does not slow it down;
`scaling` and `gpu` report the trainer's own wall-clock env-steps/s at its last iteration (start-up excluded).
"""
from __future__ import annotations

import argparse
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def env_sps(num_envs: int, steps: int, device: str, task: str = "cuboid") -> float:
    """Env-steps/s of the vmas backend with random actions; each env's episode starts at a random step, so the
    time-outs and resets are spread over the steps as in training."""
    from mapush_env import make_env

    env = make_env("vmas", num_envs=num_envs, device=device, seed=0, task=task)
    env.reset()
    env.randomize_episode_start()
    gen = torch.Generator(device=env.device).manual_seed(0)
    shape = (num_envs, env.num_agents, env.action_dim)
    for _ in range(20):  # warm-up
        env.step(torch.randn(shape, generator=gen, device=env.device))
    if env.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        env.step(torch.randn(shape, generator=gen, device=env.device))
    if env.device.type == "cuda":
        torch.cuda.synchronize()
    return num_envs * steps / (time.perf_counter() - start)


def trainer(processes: int, threads: int, flags: List[str], env_steps: int, checkout: str = ROOT):
    """Run `checkout`'s happo_mapush.py for `env_steps` (all ranks); returns (its last reported SPS, the CPU seconds
    of its processes)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    command = (launcher if processes > 1 else [sys.executable]) + [
        os.path.join(checkout, "happo_mapush.py"), "--total-timesteps", str(env_steps), "--save-interval", "1000000",
        "--log-interval", "1", *flags]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = subprocess.run(command, cwd=tempfile.mkdtemp(), capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return float(re.findall(r" SPS (\d+) ", result.stdout)[-1]), cpu


def table(header: str, rows: Dict[str, List[float]], unit: str) -> None:
    print(f"\n| {header} | {unit} (median) | min-max |\n|---|---|---|")
    for name, values in rows.items():
        print(f"| {name} | {statistics.median(values):,.0f} | {min(values):,.0f}-{max(values):,.0f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["env", "train", "scaling", "gpu"])
    parser.add_argument("--num-envs", type=int, nargs="+", default=[512, 2048], help="env mode: sizes")
    parser.add_argument("--tasks", nargs="+", default=["cuboid"], choices=["cuboid", "tblock", "cylinder"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--iterations", type=int, default=10, help="train/scaling: iterations at the defaults")
    parser.add_argument("--rounds", type=int, default=3, help="alternate the configurations this many times")
    parser.add_argument("--against", help="train, scaling: another checkout (a git worktree of an earlier commit)")
    parser.add_argument("--gpus", type=int, nargs="+", help="scaling: GPU counts (one process per GPU)")
    parser.add_argument("--smoke", action="store_true", help="gpu: tiny sizes, to check the script runs anywhere")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {os.cpu_count()} cores, "
          f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA'}")
    steps = args.iterations * 512 * 20 * 5  # the defaults' env steps per iteration and process
    rows: Dict[str, List[float]] = {}
    if args.mode == "env":
        for _ in range(args.rounds):
            for task in args.tasks:
                for n in args.num_envs:
                    rows.setdefault(f"{task}, {n} envs", []).append(env_sps(n, 200, args.device, task))
        table("env only", rows, "env-steps/s")
    elif args.mode == "train":  # one process, one thread, the defaults
        checkouts = {"this checkout": ROOT, **({args.against: args.against} if args.against else {})}
        for _ in range(args.rounds):
            for name, checkout in checkouts.items():
                _, cpu = trainer(1, 1, ["--no-cuda", *(["--task", args.tasks[0]])], steps, checkout)
                rows.setdefault(name, []).append(steps / cpu)
        table(f"training, {args.tasks[0]}, 1 process x 1 thread, {steps:,} env steps", rows, "env-steps per CPU s")
    elif args.mode == "scaling":
        cores = os.cpu_count() or 2
        configs = [(g, 1) for g in args.gpus] if args.gpus else [(1, 1), (cores, 1)]
        flags = ["--cuda" if args.gpus else "--no-cuda"]
        checkouts = {"": ROOT, **({f", {args.against}": args.against} if args.against else {})}
        for _ in range(args.rounds):
            for suffix, checkout in checkouts.items():
                for p, t in configs:  # --num-envs is per process: p processes step p x 512 envs
                    rows.setdefault(f"{p} process(es) x {t} thread{suffix}", []).append(
                        trainer(p, t, flags, p * steps, checkout)[0])
        table("configuration", rows, "env-steps/s (wall-clock, all processes)")
        for suffix in checkouts:
            mine = {name: statistics.median(v) for name, v in rows.items() if name.endswith(suffix or "thread")}
            base = next(iter(mine.values()))
            print("\n" + "\n".join(f"{name}: {sps / base:.2f}x" for name, sps in mine.items()))
    else:
        gpu_check(args.smoke)


def gpu_check(smoke: bool) -> None:
    """1. the CUDA-only tests; 2. env-only env-steps/s at 512, 4,096 and 16,384 envs; 3. training env-steps/s at the
    defaults and 4,096 envs; 4. 2 processes under torchrun on one GPU (gloo: nccl wants a GPU per process)."""
    cuda = torch.cuda.is_available()
    big, device, rows, start = not smoke and cuda, "cuda" if cuda else "cpu", [], time.time()

    def row(check: str, value: str) -> None:
        rows.append((check, value))
        print(f"{check}: {value}", flush=True)

    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "tests/"], cwd=ROOT,
                           capture_output=True, text=True)
    row("CUDA-only tests", (tests.stdout.strip().splitlines() or ["no output"])[-1])
    for num_envs in (512, 4096, 16384) if big else (64, 256):
        row(f"env only, {num_envs} envs", f"{env_sps(num_envs, 200 if big else 20, device):,.0f} env-steps/s")
    flags, iterations = ["--cuda" if cuda else "--no-cuda"], 10 if big else 2
    for num_envs in (512, 4096) if big else (64,):
        sps = trainer(1, 2 if cuda else 1, flags + ["--num-envs", str(num_envs)], iterations * num_envs * 100)[0]
        row(f"training, {num_envs} envs, 1 process", f"{sps:,.0f} env-steps/s")
    num_envs = 512 if big else 64
    sps = trainer(2, 1, flags + ["--num-envs", str(num_envs)],
                  iterations * 2 * num_envs * 100)[0]
    row(f"training, 2 processes x {num_envs} envs on one {'GPU' if cuda else 'CPU'} (gloo)", f"{sps:,.0f} env-steps/s")
    print("\n| check | result |\n|---|---|\n" + "\n".join(f"| {c} | {v} |" for c, v in rows)
          + f"\n\n{time.time() - start:.0f} s in all")
    if "failed" in rows[0][1] or "error" in rows[0][1]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
