"""The checks that need a GPU, in one short run (about 5 minutes on one GPU), printed as one table.

1. the CUDA-only tests (`pytest -m cuda`: ValueNorm on CUDA, exact resume on CUDA, the Isaac Gym device check);
2. env-only env-steps/s of the vmas backend at 512, 4,096 and 16,384 envs;
3. training env-steps/s at the defaults and at 4,096 envs;
4. one run of 2 processes under torchrun on one GPU (gloo: nccl wants a GPU per process).
Without a GPU it runs the same steps on the CPU at small sizes (CI smokes it with --smoke).

    python benchmarks/gpu_check.py            # on the GPU machine
    python benchmarks/gpu_check.py --smoke    # anywhere, tiny sizes
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from env_throughput import measure  # noqa: E402
from scaling import train_sps  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to check that the script runs")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    big = not args.smoke and cuda
    rows, start = [], time.time()

    def row(check: str, value: str) -> None:
        rows.append((check, value))
        print(f"{check}: {value}", flush=True)

    row("device", torch.cuda.get_device_name(0) if cuda else f"cpu ({os.cpu_count()} cores), no CUDA")
    row("torch", torch.__version__)
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "tests/"], cwd=ROOT,
                           capture_output=True, text=True)
    row("CUDA-only tests", (tests.stdout.strip().splitlines() or ["no output"])[-1])
    for num_envs in (512, 4096, 16384) if big else (64, 256):
        row(f"env only, {num_envs} envs", f"{measure(num_envs, 200 if big else 20, device, 'disc'):,.0f} env-steps/s")
    flags = ["--cuda" if cuda else "--no-cuda"]
    iterations = 10 if big else 2
    for num_envs in (512, 4096) if big else (64,):
        sized = flags + ["--num-envs", str(num_envs)]
        sps = train_sps(1, 1 if not cuda else 2, sized, iterations * num_envs * 100)
        row(f"training, {num_envs} envs, 1 process", f"{sps:,.0f} env-steps/s")
    num_envs = 512 if big else 64
    sps = train_sps(2, 1, flags + ["--num-envs", str(num_envs), "--dist-backend", "gloo"],
                    iterations * 2 * num_envs * 100)
    row(f"training, 2 processes x {num_envs} envs on one {'GPU' if cuda else 'CPU'} (gloo)", f"{sps:,.0f} env-steps/s")
    print("\n| check | result |\n|---|---|\n" + "\n".join(f"| {c} | {v} |" for c, v in rows)
          + f"\n\n{time.time() - start:.0f} s in all")
    if "failed" in rows[2][1] or "error" in rows[2][1]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
