"""Training throughput at the default sizes and where the wall time goes.

Runs `happo_mapush.train` in-process for a few iterations with timers wrapped around the env step, the networks'
forward passes during the rollout, the actor and critic updates, GAE, the critic's input, logging and the checkpoint
snapshot, ActionRepeat's merging of its substeps and the start-up. Everything not covered is the rollout loop's own
bookkeeping (sampling, log-probs, storage, episode stats).
Also reports env-only steps/s at the same number of envs.

    python benchmarks/profile_training.py                      # default flags, 614,400 env steps
    python benchmarks/profile_training.py --env-steps 307200 -- --num-envs 2048
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from collections import defaultdict

import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import happo_mapush as H  # noqa: E402
import lifecycle  # noqa: E402
import mapush_env  # noqa: E402
from env_throughput import measure  # noqa: E402

TOTALS = defaultdict(float)
IN_UPDATE = [False]


def timed(name, fn, rollout_only=False):
    def wrapper(*args, **kwargs):
        if rollout_only and IN_UPDATE[0]:
            return fn(*args, **kwargs)
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            TOTALS[name] += time.perf_counter() - start

    return wrapper


def update_phase(name, fn):
    def wrapper(*args, **kwargs):
        IN_UPDATE[0] = True
        try:
            return timed(name, fn)(*args, **kwargs)
        finally:
            IN_UPDATE[0] = False

    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env-steps", type=int, default=614_400, help="rounded down to whole iterations")
    parser.add_argument("trainer_flags", nargs=argparse.REMAINDER, help="after `--`: flags for happo_mapush")
    cli = parser.parse_args()
    args = tyro.cli(H.Args, args=[f for f in cli.trainer_flags if f != "--"])
    args.total_timesteps = cli.env_steps
    args = H.check_args(args)

    H.happo_actor_update = update_phase("actor updates", H.happo_actor_update)
    H.critic_update = update_phase("critic update", H.critic_update)
    H.compute_gae = timed("GAE", H.compute_gae)
    H.build_global_state = timed("critic input (global state)", H.build_global_state)
    mapush_env.VmasPushEnv.step = timed("env step", mapush_env.VmasPushEnv.step)
    # ActionRepeat.step contains its env steps: its own share is its total minus theirs (computed below)
    mapush_env.ActionRepeat.step = timed("_action repeat total", mapush_env.ActionRepeat.step)
    H.policy_env = timed("start-up (env, models, log writer)", H.policy_env)
    H.build_models = timed("start-up (env, models, log writer)", H.build_models)
    mapush_env.VmasPushEnv.scene = timed("critic input (global state)", mapush_env.VmasPushEnv.scene)
    H.Actor.dist = timed("policy inference (rollout)", H.Actor.dist, rollout_only=True)
    H.Critic.forward = timed("critic inference (rollout)", H.Critic.forward, rollout_only=True)
    from torch.utils.tensorboard import SummaryWriter

    SummaryWriter.add_scalar = timed("logging", SummaryWriter.add_scalar)
    SummaryWriter.__init__ = timed("start-up (env, models, log writer)", SummaryWriter.__init__)
    lifecycle.copy = type("copy", (), {"deepcopy": staticmethod(timed("checkpoint snapshot", copy.deepcopy))})
    torch.save = timed("checkpoint snapshot", torch.save)

    os.chdir(tempfile.mkdtemp())
    start = time.perf_counter()
    H.train(args)
    wall = time.perf_counter() - start
    per_iteration = args.num_envs * args.num_steps * args.action_repeat
    iterations = args.total_timesteps // per_iteration
    steps = iterations * per_iteration
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; num_envs {args.num_envs}, num_steps "
          f"{args.num_steps}, action_repeat {args.action_repeat}, {iterations} iterations, "
          f"minibatches {args.actor_num_minibatches}/{args.critic_num_minibatches}")
    print(f"training: {steps / wall:.0f} env-steps/s ({wall:.1f} s for {steps} steps, including start-up)")
    # inference timers also cover the update-phase-free evaluation of final-state values at time-outs
    TOTALS["action repeat: merging its substeps"] = TOTALS.pop("_action repeat total") - TOTALS["env step"]
    TOTALS["other (rollout bookkeeping)"] = wall - sum(TOTALS.values())
    print("| part | share of wall time | seconds |\n|---|---|---|")
    for name, seconds in sorted(TOTALS.items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {100 * seconds / wall:.1f} % | {seconds:.2f} |")
    print(f"env only: {measure(args.num_envs, 200, 'cpu', 'disc'):.0f} env-steps/s at {args.num_envs} envs")


if __name__ == "__main__":
    main()
