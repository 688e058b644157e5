"""Undo each documented fix in a copy of the project and run the tests the README names for it: each must fail.

A fix whose test still passes with the fix undone is not proven by that test. For every row, this script copies the
tracked files of the working tree into a temporary folder, replaces one piece of code by its buggy version (the
replaced text must occur exactly once), runs `pytest` on the named tests there and reports whether they failed. It
exits 1 if any revert leaves its tests green, 2 if a revert no longer applies (the code moved: update the row).

    python benchmarks/revert_fixes.py                 # every row, about 2 minutes on 2 cores
    python benchmarks/revert_fixes.py --only team_reward time_out_bootstrap
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> (file, fixed code, buggy code, tests that must fail, what the bug is)
REVERTS = {
    "global_state": (
        "happo_mapush.py", 'if args.critic_input == "agent0-obs":', "if True:",
        ["tests/test_happo.py::test_critic_input_width",
         "tests/test_rollout.py::test_the_critic_sees_the_post_reset_state_of_the_next_decision"],
        "the critic sees agent 0's observation whatever --critic-input says"),
    "env_relative_frame": (
        "mapush_isaacgym.py", "box_xy = npc[:, 0, 0:2] - origins_xy\n    target_xy = npc[:, 1, 0:2] - origins_xy",
        "box_xy = npc[:, 0, 0:2]\n    target_xy = npc[:, 1, 0:2]",
        ["tests/test_global_state.py::test_mqe_scene_does_not_depend_on_env_origins"],
        "box and target stay in MQE's world frame while the agents are env-relative"),
    "velocities": (
        "global_state.py",
        "scene.agent_lin_vel * LIN_VEL_SCALE,\n            scene.agent_ang_vel.unsqueeze(-1) * ANG_VEL_SCALE,",
        "torch.zeros_like(scene.agent_lin_vel),\n            torch.zeros_like(scene.agent_ang_vel).unsqueeze(-1),",
        ["tests/test_global_state.py::test_exact_vector_for_hand_built_scene"],
        "the state carries no velocities (zeros where they belong)"),
    "value_norm_once": (
        "happo_mapush.py", 'if args.value_norm_update == "once":', "if False:",
        ["tests/test_happo.py::test_value_norm_update_count",
         "tests/test_happo.py::test_value_norm_once_is_updated_on_all_returns_before_the_critic_epochs"],
        "the default never updates ValueNorm once on all returns"),
    "value_norm_in_minibatch_loop": (
        "happo_mapush.py", 'if args.value_norm_update == "per-minibatch":', "if True:",
        ["tests/test_happo.py::test_value_norm_update_count"],
        "ValueNorm moves the targets inside the mini-batch loop (HARL upstream) whatever the flag says"),
    "team_reward": (
        "happo_mapush.py", 'reward.sum(1) if args.team_reward == "sum"', 'reward[:, 0] if args.team_reward == "sum"',
        ["tests/test_rollout.py::test_the_stored_reward_is_the_team_sum_not_agent_0s_column"],
        "the critic's reward is agent 0's column"),
    "time_out_bootstrap": (
        "happo_mapush.py", 'sanitize(info["final_obs"])[0], lambda: info["final_scene"])', "episodes.obs, env.scene)",
        ["tests/test_rollout.py::test_a_time_out_bootstraps_from_the_state_before_the_reset"],
        "a time-out bootstraps from the new episode's first state (after the auto-reset)"),
    "time_out_only": (
        "happo_mapush.py", 'truncated = info["time_out"] & ~info["success"] & ~info["exception"]',
        'truncated = info["time_out"]',
        ["tests/test_rollout.py::test_only_a_plain_time_out_is_truncated"],
        "a success or an exception on a time-out step is bootstrapped as if the episode went on"),
    "value_norm_buffers": (
        "value_norm.py", 'self.register_buffer("running_mean", torch.zeros(1, device=device))',
        "self.running_mean = nn.Parameter(torch.zeros(1), requires_grad=False).to(device)",
        ["tests/test_value_norm.py::test_statistics_are_registered_on_a_device_other_than_the_cpu"],
        "HARL's unregistered statistics (nn.Parameter(...).to(device)), lost from checkpoints off the CPU"),
    "diagnostics_gae_values": (
        "happo_mapush.py", '"diagnostics/values_mean": (returns - advantages).mean()',
        '"diagnostics/values_mean": m.value_norm.denormalize(buf.values).mean()',
        ["tests/test_rollout.py::test_explained_variance_is_one_minus_var_advantages_over_var_returns"],
        "values_mean from the values denormalized after this iteration's ValueNorm step"),
}


def tracked_files() -> list:
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split()
    return [path for path in listed if os.path.isfile(os.path.join(ROOT, path))]


def try_revert(name: str, files: list) -> str:
    path, fixed, buggy, tests, _ = REVERTS[name]
    with tempfile.TemporaryDirectory() as tmp:
        for f in files:
            os.makedirs(os.path.dirname(os.path.join(tmp, f)), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, f), os.path.join(tmp, f))
        with open(os.path.join(tmp, path)) as f:
            code = f.read()
        if code.count(fixed) != 1:
            return f"does not apply ({code.count(fixed)} matches in {path})"
        with open(os.path.join(tmp, path), "w") as f:
            f.write(code.replace(fixed, buggy))
        result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], cwd=tmp,
                                capture_output=True, text=True)
        if result.returncode == 0:
            return "NOT CAUGHT: the tests pass with the fix undone"
        failed = [line.split(" ")[1] for line in result.stdout.splitlines() if line.startswith("FAILED ")]
        return f"caught: {len(failed)} failed ({', '.join(t.split('::')[-1] for t in failed) or result.stdout[-200:]})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=list(REVERTS), help="these rows only")
    args = parser.parse_args()
    files, outcome = tracked_files(), {}
    for name in args.only or list(REVERTS):
        started = time.time()
        outcome[name] = try_revert(name, files)
        print(f"{name}: {REVERTS[name][4]} -> {outcome[name]} ({time.time() - started:.0f} s)", flush=True)
    if any(o.startswith("does not apply") for o in outcome.values()):
        return 2
    return 1 if any(o.startswith("NOT CAUGHT") for o in outcome.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
