"""The run lifecycle around the trainer: run folders, atomic checkpoints, resume checks, stop signals, bad input.

Nothing here is HAPPO; it is what makes a run safe to interrupt, resume and branch (README, "Runs and resume"):
- every run writes into its own new folder `runs/<name>__<seed>__<time stamp>.<microseconds>-<pid>`;
- a checkpoint appears complete under its name or not at all (temporary file, fsync, `os.replace`), and an
  existing checkpoint is never overwritten;
- resuming from a run's newest checkpoint continues that run; from any other one it starts a new folder that names
  its parent (`parent.txt`);
- SIGINT/SIGTERM only set a flag that the trainer polls at safe points; a second SIGINT exits at once.
"""
from __future__ import annotations

import copy
import dataclasses
import fcntl
import hashlib
import math
import os
import signal
import socket
import threading
import time
import typing
from typing import Dict, List, Optional, Sequence, Tuple

import torch

# Experiments removed after they showed no measurable effect (docs/results.md has their results and the commit that
# still has them): a checkpoint that used one cannot be rebuilt by this code and is refused.
RETIRED = {"tanh_mean": False, "input_norm": "layernorm", "std_max": 0.5, "obs_stack": 1}
RETIRED_AT = "0aee1c9"  # the last commit that has them
# Flags added since: the value a checkpoint without them ran with.
ADDED = {"action_repeat": 1, "task": "cuboid", "share_actor": False, "actor_input": "obs"}
CHECKPOINT_KEYS = {"actors", "critic", "actor_optimizers", "critic_optimizer", "value_norm", "iteration",
                   "global_step", "args", "run_name"}


class UsageError(ValueError):
    """Bad flags, a missing, corrupt or foreign checkpoint: reported in one line, exit code 2."""


def args_dict(args) -> dict:
    """The flags as saved in checkpoints (tuples as lists, so they survive `torch.load(weights_only=True)`)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(args).items()}


def flag(name: str, value=None) -> str:
    """`--name value` as the command line spells it (booleans as --name / --no-name)."""
    name = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return name if value else name.replace("--", "--no-", 1)
    if isinstance(value, (tuple, list)):
        return f"{name} {' '.join(map(str, value))}"
    return name if value is None else f"{name} {value}"


def command(flags: dict, defaults: dict, launcher: str = "python") -> str:
    """The command line that gives `flags`: the script and every flag that differs from its default."""
    return " ".join([launcher, "happo_mapush.py"] + [flag(k, v) for k, v in flags.items()
                                                     if v != defaults.get(k) and v is not None])


POSITIVE = ("num_envs", "num_steps", "action_repeat", "total_timesteps", "ppo_epochs", "critic_epochs",
            "actor_num_minibatches", "critic_num_minibatches", "log_interval", "save_interval", "eval_episodes")
RANGES = {"gamma": (0, 1), "gae_lambda": (0, 1), "clip_coef": (0, math.inf), "max_grad_norm": (0, math.inf),
          "huber_delta": (0, math.inf), "learning_rate": (0, math.inf), "critic_lr": (0, math.inf)}  # low < x <= high


def check_args(args):
    """Reject the trainer's nonsense flags before anything runs, with one line naming the first problem."""
    for field in dataclasses.fields(args):  # tyro checks choices on the command line; this, Args built in Python
        choices = typing.get_args(field.type) if typing.get_origin(field.type) is typing.Literal else ()
        if choices and getattr(args, field.name) not in choices:
            raise UsageError(f"{flag(field.name)} must be one of {choices}, got {getattr(args, field.name)!r}")
    for name in POSITIVE:
        if getattr(args, name) < 1:
            raise UsageError(f"{flag(name)} must be >= 1, got {getattr(args, name)}")
    for name, (low, high) in RANGES.items():
        value = getattr(args, name)
        if not (low < value <= high and math.isfinite(value)):
            raise UsageError(f"{flag(name)} must be in ({low}, {high}] and finite, got {value}")
    if not 0 <= args.ent_coef < math.inf:
        raise UsageError(f"--ent-coef must be >= 0 and finite, got {args.ent_coef}")
    for name in ("hidden_sizes", "critic_hidden_sizes"):
        if not getattr(args, name) or min(getattr(args, name)) < 1:
            raise UsageError(f"{flag(name)} needs one or more positive layer sizes, got {getattr(args, name)}")
    if not args.exp_name or "/" in args.exp_name or os.sep in args.exp_name or ".." in args.exp_name:
        raise UsageError(f"--exp-name names a run, not a path: no '/', '{os.sep}' or '..', got {args.exp_name!r}")
    if args.resume is not None and args.eval_checkpoint is not None:
        raise UsageError("--resume and --eval-checkpoint exclude each other")
    world = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's process count: --num-envs is per process
    per_iteration = args.num_envs * args.num_steps * args.action_repeat * world
    if args.eval_checkpoint is None and args.total_timesteps < per_iteration:
        raise UsageError(f"--total-timesteps {args.total_timesteps} is below one iteration ({args.num_envs} envs x "
                         f"{args.num_steps} decisions x {args.action_repeat} env steps x {world} processes)")
    # HARL drops a remainder from every epoch; here it is an error, as it would silently change the batch.
    a, c = args.actor_num_minibatches, args.critic_num_minibatches
    need = a * c // math.gcd(a, c)  # both counts divide the batch
    step = need // math.gcd(need, args.num_steps)  # so --num-envs must be a multiple of this
    for name in ("actor_num_minibatches", "critic_num_minibatches"):
        if args.num_envs * args.num_steps % getattr(args, name):
            fits = " or ".join(f"--num-envs {n}" for n in (args.num_envs // step * step,
                                                           (args.num_envs // step + 1) * step) if n)
            raise UsageError(f"{flag(name)} {getattr(args, name)} does not divide the batch of "
                             f"{args.num_envs * args.num_steps} samples (--num-envs {args.num_envs} x --num-steps "
                             f"{args.num_steps}); {fits} would")
    return args


def load_checkpoint(path: str, device) -> dict:
    if not os.path.isfile(path):
        raise UsageError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # torch raises many types for a truncated or foreign file
        raise UsageError(f"corrupt or unreadable checkpoint {path}: {str(err).splitlines()[0]}") from None
    if not isinstance(checkpoint, dict) or not CHECKPOINT_KEYS <= set(checkpoint):
        raise UsageError(f"corrupt checkpoint {path}: not a happo_mapush checkpoint")
    checkpoint["args"] = {**ADDED, **checkpoint["args"]}  # an older checkpoint ran with what these flags now default to
    for name, value in RETIRED.items():
        if checkpoint["args"].get(name, value) != value:
            raise UsageError(f"{path} uses {flag(name, checkpoint['args'][name])}, an experiment removed after commit "
                             f"{RETIRED_AT} (docs/results.md); evaluate it with that commit")
    return checkpoint


def resume_differences(saved: dict, current: dict, free: Sequence[str]) -> List[str]:
    """Every flag outside `free` whose value differs from the checkpoint's, as `--flag new (saved --flag old)`."""
    def value(k, v):
        return flag(k, v) if isinstance(v, bool) else " ".join(map(str, v)) if isinstance(v, list) else str(v)

    return [f"{flag(k, current[k])} (saved {value(k, saved.get(k))})" for k in current
            if k not in free and saved.get(k) != current[k]]


def checkpoint_iterations(run_dir: str) -> List[int]:
    """The iterations of the complete checkpoints in a run folder, in order."""
    numbers = (n[len("checkpoint_"):-len(".pt")] for n in os.listdir(run_dir) if n.startswith("checkpoint_"))
    return sorted(int(n) for n in numbers if n.isdigit())


class RunFolder:
    """Rank 0's run folder while it trains: `path`, whether it `continuing` a run, and its TensorBoard `writer`.

    One process writes a run folder at a time: it holds an exclusive OS lock (flock) on `<path>/.lock`, which the
    kernel releases when the process ends, however it ends (a SIGKILLed run never blocks a later resume)."""

    def __init__(self, path: str, continuing: bool, lock_fd: int):
        self.path, self.continuing, self.lock_fd, self.writer = path, continuing, lock_fd, None

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        os.close(self.lock_fd)  # releases the lock


def lock_folder(folder: str) -> int:
    """Take the run folder's lock (the open file descriptor holds it), or a UsageError naming the holder."""
    fd = os.open(os.path.join(folder, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise UsageError(f"{folder} is being written by {holder}; one process writes a run at a time: wait for it to "
                         f"end, or resume from an older checkpoint to start a branch") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    return fd


def open_run_dir(name: str, resume: Optional[str], checkpoint: Optional[dict]) -> RunFolder:
    """The run folder, locked. From a run's newest checkpoint the run continues in its folder (later checkpoints get
    higher numbers, so nothing is overwritten); any other start gets a new folder, created exclusively, named `name`
    plus a time stamp with microseconds and the process id. A branch records its parent checkpoint and its hash in
    `parent.txt`."""
    if checkpoint is not None:
        folder = os.path.dirname(os.path.abspath(resume))
        iteration = checkpoint["iteration"]
        if (os.path.basename(folder) == checkpoint["run_name"] and checkpoint_iterations(folder)[-1] == iteration
                and os.path.basename(resume) == f"checkpoint_{iteration}.pt"):
            fd = lock_folder(folder)  # refused while another process writes this run
            if checkpoint_iterations(folder)[-1] == iteration:  # still the newest now that no one else writes
                return RunFolder(os.path.relpath(folder), True, fd)
            os.close(fd)
    now = time.time()
    stamp = f"{time.strftime('%Y%m%d-%H%M%S', time.localtime(now))}.{int(now % 1 * 1e6):06d}-{os.getpid()}"
    run_dir = os.path.join("runs", f"{name}__{stamp}")
    os.makedirs(run_dir, exist_ok=False)
    folder = RunFolder(run_dir, False, lock_folder(run_dir))
    if checkpoint is not None:
        with open(resume, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        with open(os.path.join(run_dir, "parent.txt"), "w") as f:
            f.write(f"branched from {os.path.abspath(resume)} (iteration {checkpoint['iteration']}, sha256 {digest})\n")
    return folder


def atomic_save(state: dict, path: str) -> str:
    """Write `state` so that a crash at any moment leaves the complete file or nothing under `path`. A path that
    exists already holds this run's same iteration (a continued run saves only higher ones): it is kept."""
    if os.path.exists(path):
        return path
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def save_checkpoint(state: dict, ranks: list, run_dir: str) -> str:
    """A snapshot as checkpoint_<iteration>.pt in `run_dir`, with every rank's own part in "ranks"."""
    full = {**{k: v for k, v in state.items() if k != "local"}, "ranks": ranks, "world_size": len(ranks),
            "run_name": os.path.basename(run_dir)}
    return atomic_save(full, os.path.join(run_dir, f"checkpoint_{state['iteration']}.pt"))


class StopRequest:
    """SIGINT and SIGTERM set `signum`, which the trainer polls at safe points, so that it saves the last consistent
    state before exiting; a second SIGINT exits at once (SystemExit 130) without saving. A signal the parent told us
    to ignore (nohup, a shell's background job ignores SIGINT) stays ignored; outside the main thread signals cannot
    be caught, and nothing is installed."""

    def __init__(self):
        self.signum = 0
        self.previous: Dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)
                             if signal.getsignal(s) is not signal.SIG_IGN}

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise SystemExit(128 + signum)
        self.signum = signum

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# The flags a resume may change, as they cannot change what the run computes (--total-timesteps too, unless
# --anneal-lr spreads its schedule over it); every other flag must match the checkpoint.
RESUME_FREE = ("exp_name", "track", "wandb_project_name", "log_interval", "save_interval", "resume",
               "eval_checkpoint", "eval_episodes")


def resume_problem(path: str, current: dict, world: int, num_iterations: int):
    """The checkpoint at `path` if the run `current` (its flags) may resume from it, else why not, in one line."""
    try:
        checkpoint = load_checkpoint(path, "cpu")
    except UsageError as err:
        return str(err)
    free = RESUME_FREE if current["anneal_lr"] else RESUME_FREE + ("total_timesteps",)
    differ = resume_differences(checkpoint["args"], current, free)
    if differ:
        return f"--resume {path}: these flags differ from the checkpoint's run: {', '.join(differ)}"
    if "ranks" not in checkpoint or checkpoint["world_size"] != world:
        return (f"--resume {path}: the run used {checkpoint.get('world_size', 1)} process(es), this one {world}; "
                f"resume it with as many (torchrun --nnodes x --nproc_per_node)")
    if checkpoint["iteration"] >= num_iterations:
        return (f"nothing to train: {path} is at iteration {checkpoint['iteration']} of {num_iterations}; "
                f"raise --total-timesteps")
    return checkpoint


def snapshot(models, iteration: int, global_step: int, flags: dict, env, ep_return: torch.Tensor,
             ep_length: torch.Tensor) -> dict:
    """Everything needed to continue a run exactly, cloned so that later updates leave it alone. "local" is this
    rank's own part (RNG, envs, each env's episode so far); the rest is the same on every rank."""
    return copy.deepcopy({
        "actors": [a.state_dict() for a in models.actors], "critic": models.critic.state_dict(),
        "actor_optimizers": [o.state_dict() for o in models.actor_optimizers],
        "critic_optimizer": models.critic_optimizer.state_dict(), "value_norm": models.value_norm.state_dict(),
        "iteration": iteration, "global_step": global_step, "args": flags,
        "local": {"rng": {"torch": torch.get_rng_state(),
                          "cuda": torch.cuda.get_rng_state() if ep_return.is_cuda else None},
                  "env": env.state_dict() if hasattr(env, "state_dict") else None,
                  "episode": {"return": ep_return, "length": ep_length}}})


def restore(models, checkpoint: dict, rank: int, env) -> Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Load a snapshot's state into the models, this rank's RNG and (where the env can) its envs. Returns the
    restored (observation, episode returns, episode lengths), or None where the env cannot be restored (MQE)."""
    for module, state in zip(models.actors + models.actor_optimizers,
                             checkpoint["actors"] + checkpoint["actor_optimizers"]):
        module.load_state_dict(state)
    models.critic.load_state_dict(checkpoint["critic"])
    models.critic_optimizer.load_state_dict(checkpoint["critic_optimizer"])
    models.value_norm.load_state_dict(checkpoint["value_norm"])
    own = checkpoint["ranks"][rank]
    torch.set_rng_state(own["rng"]["torch"].cpu())
    device = models.value_norm.running_mean.device
    if own["rng"]["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(own["rng"]["cuda"].cpu())
    if own["env"] is None or not hasattr(env, "load_state_dict"):  # MQE: the simulator restarts its episodes
        return None
    try:
        obs = env.load_state_dict(own["env"])
    except ValueError as err:  # an env state the env cannot continue exactly
        raise UsageError(f"cannot resume: {err}") from None
    return obs, own["episode"]["return"].to(obs.device), own["episode"]["length"].to(obs.device)


def open_writer(flags: dict, run_dir: str, continuing: bool, global_step: int, track: bool, project: str):
    """TensorBoard (and W&B with --track); a continued run hides whatever was logged after its checkpoint."""
    from torch.utils.tensorboard import SummaryWriter

    if track:
        try:
            import wandb
        except ImportError:
            raise UsageError("--track logs to Weights and Biases: pip install wandb") from None
        wandb.init(project=project, sync_tensorboard=True, config=flags, name=os.path.basename(run_dir),
                   save_code=True, resume="allow")
    writer = SummaryWriter(run_dir, purge_step=global_step + 1 if continuing else None)
    if not continuing:
        writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in flags.items()))
    return writer


def open_run(flags: dict, checkpoint: Optional[dict], global_step: int, num_iterations: int, device):
    """Rank 0's side of a run: its folder (locked), the writer, and one line that says what runs where. Returns the
    RunFolder, or why the run cannot start, in one line (so that every rank can stop)."""
    name = f"mapush_{flags['env_backend']}__{flags['exp_name']}__{flags['seed']}"
    try:
        folder = open_run_dir(name, flags["resume"], checkpoint)
    except UsageError as err:
        return str(err)
    folder.writer = open_writer(flags, folder.path, folder.continuing, global_step, flags["track"],
                                flags["wandb_project_name"])
    first = checkpoint["iteration"] + 1 if checkpoint is not None else 1
    print(f"training: {flags['world_size']} process(es) on {device}, {flags['num_envs']} envs x {flags['num_steps']} "
          f"decisions x {flags['action_repeat']} env steps per iteration and process, iterations {first}-"
          f"{num_iterations}, run folder {folder.path}{' (continued)' if folder.continuing else ''}\n  then: python "
          f"happo_mapush.py --eval-checkpoint {folder.path}/checkpoint_{num_iterations}.pt", flush=True)
    return folder


class Progress:
    """The progress line every `interval` iterations: success since the last line, SPS, elapsed time and ETA."""

    def __init__(self, interval: int, num_iterations: int, start_iteration: int, global_step: int):
        self.interval, self.num_iterations, self.start_iteration = interval, num_iterations, start_iteration
        self.start, self.start_step, self.episodes, self.successes = time.time(), global_step, 0.0, 0.0

    def sps(self, global_step: int) -> float:
        return (global_step - self.start_step) / max(time.time() - self.start, 1e-9)

    def line(self, iteration: int, global_step: int, scalars: Dict[str, float]) -> None:
        self.episodes += scalars.get("charts/episodes", 0.0)
        self.successes += scalars.get("charts/success_rate", 0.0) * scalars.get("charts/episodes", 0.0)
        if iteration % self.interval and iteration != self.num_iterations:
            return
        count, elapsed = self.episodes, time.time() - self.start
        success = f"{self.successes / count:.3f} of {int(count)} episodes" if count else "n/a (no episode ended)"
        eta = elapsed / (iteration - self.start_iteration + 1) * (self.num_iterations - iteration)
        self.episodes = self.successes = 0.0
        print(f"iter {iteration}/{self.num_iterations} step {global_step} SPS {int(scalars['charts/SPS'])} success "
              f"{success} value_loss {scalars['losses/value_loss']:.4f} explained_var "
              f"{scalars['losses/explained_variance']:.3f} elapsed {hms(elapsed)} ETA {hms(eta)}", flush=True)


def report_stop(signum: int, path: str, iteration: int, num_iterations: int, flags: dict, defaults: dict,
                world: int) -> None:
    launcher = f"torchrun --nproc_per_node {world}" if world > 1 else "python"
    print(f"stopped by {signal.Signals(signum).name}: saved {path} (iteration {iteration} of {num_iterations}); "
          f"continue with:\n  {command(flags, defaults, launcher)}", flush=True)
