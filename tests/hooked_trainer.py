"""`python tests/hooked_trainer.py FLAGS...` runs happo_mapush.py's main with test hooks set by the environment:

- HOOK_STEP_DELAY=s: every env step also sleeps s seconds (a slow simulator, so a signal lands mid-run);
- HOOK_SLOW_SAVE=n: the n-th checkpoint write (1-based) writes the first half of the real serialized bytes, prints
  SAVING and hangs, as a save interrupted by a crash or a kill would leave it;
- HOOK_SAME_SEED=1: every rank seeds its envs and sampling with the base seed, and draws the agent order from its
  global generator as one process does (so ranks hold identical data and run exactly one process's steps);
- HOOK_DUMP_STATE=folder: at exit each rank saves its last snapshot (models, optimizers, ValueNorm, its own RNG,
  envs and episode state) to folder/rank<RANK>.pt;
- HOOK_NAN_RANK=r: from the second iteration on, rank r's advantages are NaN (a non-finite loss on one rank only).
Nothing else changes: the trainer, torch.distributed, its signal handling and its files are the real ones.
"""
import io
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import happo_mapush  # noqa: E402
import lifecycle  # noqa: E402
import mapush_vmas  # noqa: E402

delay = float(os.environ.get("HOOK_STEP_DELAY", "0"))
if delay > 0:
    real_step = mapush_vmas.VmasPushEnv.step

    def slow_step(self, actions):
        time.sleep(delay)
        return real_step(self, actions)

    mapush_vmas.VmasPushEnv.step = slow_step

slow_save = int(os.environ.get("HOOK_SLOW_SAVE", "0"))
if slow_save > 0:
    real_save, saves = torch.save, []

    def hanging_save(obj, f, *args, **kwargs):
        saves.append(1)
        if len(saves) < slow_save:
            return real_save(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        real_save(obj, buffer)
        data = buffer.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        print("SAVING", flush=True)
        time.sleep(600)

    torch.save = hanging_save

if os.environ.get("HOOK_SAME_SEED") == "1":
    lifecycle.rank_seed = lambda seed: seed
    lifecycle.order_generator = lambda seed, world: torch.default_generator

if os.environ.get("HOOK_NAN_RANK") == os.environ.get("RANK", "0"):
    real_gae, calls = happo_mapush.compute_gae, []

    def nan_gae(*args, **kwargs):
        calls.append(1)
        advantages, returns = real_gae(*args, **kwargs)
        return (advantages * float("nan") if len(calls) >= 2 else advantages), returns

    happo_mapush.compute_gae = nan_gae

dump, last = os.environ.get("HOOK_DUMP_STATE"), []
if dump:
    real_snapshot = lifecycle.snapshot

    def recording_snapshot(*args, **kwargs):
        last[:] = [real_snapshot(*args, **kwargs)]
        return last[0]

    lifecycle.snapshot = recording_snapshot

try:
    code = happo_mapush.main()
finally:
    if dump and last:
        torch.save(last[0], os.path.join(dump, f"rank{os.environ.get('RANK', '0')}.pt"))
sys.exit(code)
