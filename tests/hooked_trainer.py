"""`python tests/hooked_trainer.py FLAGS...` runs happo_mapush.py's main with test hooks set by the environment:

- HOOK_STEP_DELAY=s: every env step also sleeps s seconds (a slow simulator, so a signal lands mid-run);
- HOOK_SLOW_SAVE=n: the n-th checkpoint write (1-based) writes the first half of the real serialized bytes, prints
  SAVING and hangs, as a save interrupted by a crash or a kill would leave it.
Nothing else changes: the trainer, its signal handling and its files are the real ones.
"""
import io
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import happo_mapush  # noqa: E402
import mapush_env  # noqa: E402

delay = float(os.environ.get("HOOK_STEP_DELAY", "0"))
if delay > 0:
    real_step = mapush_env.VmasPushEnv.step

    def slow_step(self, actions):
        time.sleep(delay)
        return real_step(self, actions)

    mapush_env.VmasPushEnv.step = slow_step

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

sys.exit(happo_mapush.main())
