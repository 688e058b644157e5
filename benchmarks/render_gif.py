"""Render a trained policy pushing the box to a GIF, headless (matplotlib's Agg backend, no display).

    python benchmarks/render_gif.py runs/RUN/checkpoint_390.pt                # benchmarks/results/push_<time>.gif
    python benchmarks/render_gif.py runs/RUN/checkpoint_390.pt --out benchmarks/results/push.gif   # the README's
"""
from __future__ import annotations

import argparse
import io
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import happo_mapush as H  # noqa: E402
from mapush_task import DT, SUCCESS_RADIUS, TASKS  # noqa: E402
from mapush_vmas import AGENT_DISC_RADIUS  # noqa: E402

BOX_SIZE = TASKS["cuboid"].parts[0].size[0]


def draw(ax, scene, env_id: int, title: str) -> None:
    from matplotlib import patches

    box = scene.box_xy[env_id].tolist()
    yaw = scene.box_yaw[env_id].item()
    target = scene.target_xy[env_id].tolist()
    ax.add_patch(patches.Circle(target, SUCCESS_RADIUS, fill=False, ls="--", color="tab:green"))
    ax.add_patch(patches.Circle(target, 0.5, color="tab:green", alpha=0.35))
    half = BOX_SIZE / 2
    corner = (box[0] - half * (math.cos(yaw) - math.sin(yaw)), box[1] - half * (math.sin(yaw) + math.cos(yaw)))
    ax.add_patch(patches.Rectangle(corner, BOX_SIZE, BOX_SIZE, angle=math.degrees(yaw), color="tab:brown"))
    for i, color in enumerate(("tab:blue", "tab:orange")):
        x, y = scene.agent_xy[env_id, i].tolist()
        heading = scene.agent_yaw[env_id, i].item()
        ax.add_patch(patches.Circle((x, y), AGENT_DISC_RADIUS, color=color))
        ax.arrow(x, y, 0.35 * math.cos(heading), 0.35 * math.sin(heading), width=0.03, color="k")
    ax.set_xlim(box[0] - 4, box[0] + 4)
    ax.set_ylim(box[1] - 3, box[1] + 3)
    ax.set_aspect("equal")
    ax.set_title(title, fontsize=9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--out", help="the GIF to write (default: a new benchmarks/results/push_<time>.gif)")
    parser.add_argument("--episodes", type=int, default=3, help="episodes to show, successful ones first")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--frame-skip", type=int, default=5, help="env steps per frame (0.1 s at 5)")
    args = parser.parse_args()
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"push_{time.strftime('%Y%m%d-%H%M%S')}.gif")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    checkpoint = H.load_checkpoint(args.checkpoint, "cpu")
    env = H.policy_env({**checkpoint["args"], "env_backend": "vmas"}, 64, "cpu", args.seed)
    actors = H.trained_actors(checkpoint, env)
    stride = max(1, args.frame_skip // env.k)  # decisions per frame; a decision holds its action for k env steps
    # Record all 64 envs' first episodes, then show the first few that succeed (and say how many did).
    obs = env.reset()
    scenes, finished = [env.scene()], torch.zeros(64, dtype=torch.bool)
    success, length = torch.zeros(64, dtype=torch.bool), torch.zeros(64, dtype=torch.long)
    with torch.no_grad():
        for decision in range(1, env.episode_steps + 2):
            obs, _, done, info = env.step(H.mean_actions(actors, obs))
            scenes.append(info["final_scene"])
            first = done & ~finished
            success |= first & info["success"]
            length = torch.where(first, torch.full_like(length, decision), length)
            finished |= done
            if bool(finished.all()):
                break
    shown = torch.sort((~success).int(), stable=True).indices[: args.episodes].tolist()  # successes first
    frames = []
    fig, ax = plt.subplots(figsize=(4.8, 3.8))
    for env_id in shown:
        for d in list(range(0, int(length[env_id]) + 1, stride)) + [int(length[env_id])] * 8:
            ax.clear()
            draw(ax, scenes[d], env_id, f"t = {d * env.k * DT:4.1f} s   "
                                        f"(success in {success.float().mean():.0%} of 64 envs)")
            buffer = io.BytesIO()
            fig.savefig(buffer, format="png", dpi=70)
            frames.append(Image.open(buffer).convert("P", palette=Image.ADAPTIVE))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    frames[0].save(out, save_all=True, append_images=frames[1:], duration=int(1000 * DT * env.k * stride),
                   loop=0)
    print(f"wrote {out}: {len(frames)} frames, episodes {shown}")


if __name__ == "__main__":
    main()
