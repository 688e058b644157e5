"""Everything around the training loop that is not RL: run folders, atomic checkpoints, resume checks, stop signals,
bad input, the progress line and torchrun's process group. `happo_mapush.py` meets it through one class, `Run`.

- every run writes into its own new folder `runs/<name>__<seed>__<time stamp>.<microseconds>-<pid>`;
- a checkpoint appears complete under its name or not at all (temporary file, fsync, `os.replace`), and an
  existing checkpoint is never overwritten;
- resuming from a run's newest checkpoint continues that run; from any other one it starts a new folder that names
  its parent (`parent.txt`);
- SIGINT/SIGTERM only set a flag that the run reads at the end of each iteration; a second SIGINT exits at once;
- under torchrun (RANK, LOCAL_RANK, WORLD_SIZE in the environment) each rank seeds its envs and sampling with seed +
  rank, `Run.wrap` puts the networks in DistributedDataParallel (gradients averaged during backward), the logged
  scalars are reduced over ranks here, and rank 0 alone writes. In one process none of this does anything.
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
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

# Flags of experiments that left the script (no measurable effect, or never measured): a checkpoint that used one
# cannot be rebuilt by this code and is refused. The only value this code still runs, per removed flag, and the
# removed choices of flags that stay; docs/results.md ("Removed experiments") names the code that has each.
RETIRED = {"tanh_mean": False, "input_norm": "layernorm", "std_max": 0.5, "obs_stack": 1, "actor_input": "obs",
           "anneal_lr": False}
RETIRED_CHOICES = {"critic_input": "global-state-vel"}
# Flags added since: the value a checkpoint without them ran with.
ADDED = {"action_repeat": 1, "task": "cuboid", "share_actor": False}
CHECKPOINT_KEYS = {"actors", "critic", "actor_optimizers", "critic_optimizer", "value_norm", "iteration",
                   "global_step", "args", "run_name"}


# -- torchrun: one process per GPU or core group; every helper is a no-op in one process ---------------------------


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if world_size() > 1 else 0


def init_distributed(cuda: bool) -> torch.device:
    """Join torchrun's process group when launched by it; returns this process's device: cuda:LOCAL_RANK on CUDA.
    nccl wants a GPU per process: with more processes than GPUs on a node they share them round-robin over gloo,
    which is also the CPU's backend."""
    cuda = cuda and torch.cuda.is_available()
    gpus = torch.cuda.device_count() if cuda else 0
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0')) % max(gpus, 1)}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda and int(os.environ.get("LOCAL_WORLD_SIZE", "1")) <= gpus else "gloo")
    return device


def shutdown() -> None:
    """Leave the process group. Gloo's worker threads free their last work objects, which takes the GIL, while
    ProcessGroupGloo's destructor holds the GIL and waits for them (a deadlock seen with torch 2.4.1 about once in
    ten runs): a short sleep, which releases the GIL, lets them finish first."""
    if dist.is_available() and dist.is_initialized():
        time.sleep(0.2)
        dist.destroy_process_group()


def rank_seed(seed: int) -> int:
    """The seed of this rank's envs and action sampling: ranks explore differently (seed + global RANK)."""
    return seed + rank()


def order_generator(seed: int, world: int) -> torch.Generator:
    """Where HAPPO draws its agent order. Every rank must update the same agent at the same time (DDP reduces one
    network's gradients at a time), so under torchrun it is a generator seeded alike on every rank; in one process it
    is torch's global generator, so that a run computes exactly what the single-process trainer always did."""
    return torch.default_generator if world == 1 else torch.Generator().manual_seed(seed)


def all_reduce(x: torch.Tensor, op: str = "SUM") -> torch.Tensor:
    """The sum (or with op="MAX" the maximum) over ranks of a tensor every rank holds."""
    if world_size() == 1:
        return x
    x = x.cuda() if dist.get_backend() == "nccl" else x.clone()  # nccl moves CUDA tensors only
    dist.all_reduce(x, op=getattr(dist.ReduceOp, op))
    return x


def broadcast(obj):
    """Rank 0's `obj` (any picklable object) on every rank."""
    box = [obj]
    if world_size() > 1:
        dist.broadcast_object_list(box, 0)
    return box[0]


def gather(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


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
    used = checkpoint["args"]
    retired = [name for name, value in RETIRED.items() if used.get(name, value) != value]
    retired += [name for name, value in RETIRED_CHOICES.items() if used.get(name) == value]
    if retired:
        raise UsageError(f"{path} uses {flag(retired[0], used[retired[0]])}, an experiment this code no longer has; "
                         f"docs/results.md (Removed experiments) names the commit to evaluate or resume it with")
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


# The flags a resume may change, as they cannot change what the run computes; every other flag must match the
# checkpoint.
RESUME_FREE = ("exp_name", "log_interval", "save_interval", "resume", "eval_checkpoint", "eval_episodes",
               "total_timesteps")


def resume_problem(path: str, current: dict, world: int, num_iterations: int):
    """The checkpoint at `path` if the run `current` (its flags) may resume from it, else why not, in one line."""
    try:
        checkpoint = load_checkpoint(path, "cpu")
    except UsageError as err:
        return str(err)
    differ = resume_differences(checkpoint["args"], current, RESUME_FREE)
    if differ:
        return f"--resume {path}: these flags differ from the checkpoint's run: {', '.join(differ)}"
    if "ranks" not in checkpoint or checkpoint["world_size"] != world:
        return (f"--resume {path}: the run used {checkpoint.get('world_size', 1)} process(es), this one {world}; "
                f"resume it with as many (torchrun --nnodes x --nproc_per_node)")
    if checkpoint["iteration"] >= num_iterations:
        return (f"nothing to train: {path} is at iteration {checkpoint['iteration']} of {num_iterations}; "
                f"raise --total-timesteps")
    return checkpoint


def snapshot(run: "Run", iteration: int) -> dict:
    """Everything needed to continue a run exactly, cloned so that later updates leave it alone. "local" is this
    rank's own part (RNG, envs, each env's episode so far); the rest is the same on every rank."""
    m, episodes = run.models, run.episodes
    return copy.deepcopy({
        "actors": [a.state_dict() for a in m.actors], "critic": m.critic.state_dict(),
        "actor_optimizers": [o.state_dict() for o in m.actor_optimizers],
        "critic_optimizer": m.critic_optimizer.state_dict(), "value_norm": m.value_norm.state_dict(),
        "iteration": iteration, "global_step": run.global_step_at(iteration), "args": run.flags,
        "order_rng": run.order_rng.get_state() if run.world > 1 else None,
        "local": {"rng": {"torch": torch.get_rng_state(),
                          "cuda": torch.cuda.get_rng_state() if run.device.type == "cuda" else None},
                  "env": run.env.state_dict() if hasattr(run.env, "state_dict") else None,
                  "episode": {"return": episodes.ep_return, "length": episodes.ep_length}}})


def restore(run: "Run", checkpoint: dict) -> None:
    """Load a snapshot into the run's models, this rank's RNG and (where the env can) its envs and episodes; MQE
    cannot restore its simulator and restarts its episodes."""
    m = run.models
    for module, state in zip(m.actors + m.actor_optimizers, checkpoint["actors"] + checkpoint["actor_optimizers"]):
        module.load_state_dict(state)
    m.critic.load_state_dict(checkpoint["critic"])
    m.critic_optimizer.load_state_dict(checkpoint["critic_optimizer"])
    m.value_norm.load_state_dict(checkpoint["value_norm"])
    if checkpoint.get("order_rng") is not None:
        run.order_rng.set_state(checkpoint["order_rng"].cpu())
    own = checkpoint["ranks"][run.rank]
    torch.set_rng_state(own["rng"]["torch"].cpu())
    if own["rng"]["cuda"] is not None and run.device.type == "cuda":
        torch.cuda.set_rng_state(own["rng"]["cuda"].cpu())
    if own["env"] is None or not hasattr(run.env, "load_state_dict"):
        return
    try:
        obs = run.env.load_state_dict(own["env"])
    except ValueError as err:  # an env state the env cannot continue exactly
        raise UsageError(f"cannot resume: {err}") from None
    run.episodes.obs = obs
    run.episodes.ep_return = own["episode"]["return"].to(obs.device)
    run.episodes.ep_length = own["episode"]["length"].to(obs.device)


def open_writer(flags: dict, run_dir: str, continuing: bool, global_step: int):
    """TensorBoard; a continued run hides whatever was logged after its checkpoint."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(run_dir, purge_step=global_step + 1 if continuing else None)
    if not continuing:
        writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in flags.items()))
    return writer


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


class Run:
    """One training run's bookkeeping, so that the training loop holds only RL:

        with Run(args) as run:                # process group, seeding, resume checks, signals
            ... build env, models, episodes on run.device with run.seed ...
            run.start(models, env, episodes)  # restore a resumed run into them; open (lock) the run folder
            for iteration in run.iterations():
                ... rollout, GAE, updates ...
                run.end_iteration(iteration, sums, means)  # log, save, stop on a signal or a non-finite loss

    `models` has `actors`, `actor_optimizers`, `critic`, `critic_optimizer` and `value_norm`; `episodes` has `obs`,
    `ep_return` and `ep_length` (restored in place). `run.path` is the newest checkpoint (rank 0)."""

    def __init__(self, args):
        self.args, self.flags, self.defaults = args, args_dict(args), args_dict(type(args)())
        self.device = init_distributed(args.cuda)
        self.world, self.rank = world_size(), rank()
        self.per_iteration = args.num_envs * args.num_steps * args.action_repeat * self.world  # env steps, all ranks
        self.num_iterations = args.total_timesteps // self.per_iteration  # >= 1: check_args
        self.checkpoint = None
        if args.resume is not None:  # rank 0 reads the file; every rank gets it, or the same error
            checkpoint = broadcast(resume_problem(args.resume, self.flags, self.world, self.num_iterations)
                                   if self.rank == 0 else None)
            if isinstance(checkpoint, str):
                raise UsageError(checkpoint)
            self.checkpoint = checkpoint
        self.start_iteration = 1 if self.checkpoint is None else self.checkpoint["iteration"] + 1
        self.seed, self.order_rng = rank_seed(args.seed), order_generator(args.seed, self.world)
        torch.manual_seed(self.seed)  # every rank starts from rank 0's weights all the same (DDP broadcasts them)
        self.folder: Optional[RunFolder] = None
        self.path, self.stop = "", StopRequest()

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, *exc) -> None:
        self.stop.restore()
        if self.folder is not None:
            self.folder.close()  # the writer, then the lock

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """What the update functions train: under torchrun the module in DistributedDataParallel, which gives every
        rank rank 0's weights now and averages the gradients over ranks inside `backward`; in one process the module."""
        if self.world == 1:
            return module
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(module, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def global_step_at(self, iteration: int) -> int:
        return iteration * self.per_iteration if self.checkpoint is None else (
            self.checkpoint["global_step"] + (iteration - self.checkpoint["iteration"]) * self.per_iteration)

    def start(self, models, env, episodes) -> None:
        self.models, self.env, self.episodes = models, env, episodes
        if self.checkpoint is not None:
            restore(self, self.checkpoint)
        # Rank 0 opens (and locks) the run folder, TensorBoard and prints the start-up line; a refusal stops all.
        problem = None
        if self.rank == 0:
            name = f"mapush_{self.flags['env_backend']}__{self.flags['exp_name']}__{self.flags['seed']}"
            try:
                self.folder = open_run_dir(name, self.args.resume, self.checkpoint)
            except UsageError as err:
                problem = str(err)
        problem = broadcast(problem)
        if problem is not None:
            raise UsageError(problem)
        step = self.global_step_at(self.start_iteration - 1)
        if self.folder is not None:
            self.folder.writer = open_writer({**self.flags, "world_size": self.world}, self.folder.path,
                                             self.folder.continuing, step)
            self.path = self.args.resume if self.folder.continuing else ""
            print(f"training: {self.world} process(es) on {self.device}, {self.args.num_envs} envs x "
                  f"{self.args.num_steps} decisions x {self.args.action_repeat} env steps per iteration and process, "
                  f"iterations {self.start_iteration}-{self.num_iterations}, run folder {self.folder.path}"
                  f"{' (continued)' if self.folder.continuing else ''}\n  then: python happo_mapush.py "
                  f"--eval-checkpoint {self.folder.path}/checkpoint_{self.num_iterations}.pt", flush=True)
        self.progress = Progress(self.args.log_interval, self.num_iterations, self.start_iteration, step)
        self.last_good = snapshot(self, self.start_iteration - 1)

    def iterations(self) -> range:
        return range(self.start_iteration, self.num_iterations + 1)

    def save(self, state: dict) -> str:
        """Every rank calls it: rank 0 writes the checkpoint with every rank's own part (RNG, envs)."""
        ranks = gather(state["local"])
        if self.folder is not None:
            self.path = save_checkpoint(state, ranks, self.folder.path)
        return self.path

    def end_iteration(self, iteration: int, sums: Dict[str, torch.Tensor], means: Dict[str, torch.Tensor]) -> None:
        """Log the iteration (`sums` summed over ranks, `means` averaged), then: a non-finite loss stops every rank
        with the last good checkpoint; a snapshot; a checkpoint every --save-interval iterations and at the end; a
        stop signal on any rank stops every rank after saving."""
        scalars = self.reduce(sums, means)
        nonfinite = sorted(k for k, value in scalars.items() if k.endswith("loss") and not math.isfinite(value))
        if nonfinite:  # every rank sees the same reduced scalars, so every rank stops here
            path = self.save(self.last_good)
            raise SystemExit(f"non-finite {', '.join(nonfinite)} at iteration {iteration}; stopped. The last good "
                             f"checkpoint (iteration {self.last_good['iteration']}) is {path}" if self.rank == 0 else 1)
        step = self.global_step_at(iteration)
        scalars["charts/SPS"] = self.progress.sps(step)
        if self.folder is not None:
            for name, value in scalars.items():
                self.folder.writer.add_scalar(name, value, step)
            self.progress.line(iteration, step, scalars)
        self.last_good = snapshot(self, iteration)
        if iteration % self.args.save_interval == 0 or iteration == self.num_iterations:
            self.save(self.last_good)
        signum = int(all_reduce(torch.tensor(float(self.stop.signum)), "MAX").item())  # the same on every rank
        if signum and iteration < self.num_iterations:  # SIGINT/SIGTERM: save this iteration, then stop
            path = self.save(self.last_good)
            if self.folder is not None:
                launcher = f"torchrun --nproc_per_node {self.world}" if self.world > 1 else "python"
                print(f"stopped by {signal.Signals(signum).name}: saved {path} (iteration {iteration} of "
                      f"{self.num_iterations}); continue with:\n  "
                      f"{command({**self.flags, 'resume': path}, self.defaults, launcher)}", flush=True)
            raise SystemExit(128 + signum)

    def reduce(self, sums: Dict[str, torch.Tensor], means: Dict[str, torch.Tensor]) -> Dict[str, float]:
        """Sums and means over ranks in two transfers; episode counts become rates, reward terms per env step."""
        scalars: Dict[str, float] = {}
        for group, average in ((sums, False), (means, True)):
            values = all_reduce(torch.stack([torch.as_tensor(v).float().reshape(()).to(self.device)
                                             for v in group.values()]))
            scalars.update({name: value / (self.world if average else 1)
                            for name, value in zip(group, values.tolist())})
        ended = {name[len("episodes/"):]: scalars.pop(name) for name in list(scalars) if name.startswith("episodes/")}
        if ended.get("count", 0) > 0:  # episode lengths in env steps
            count = ended["count"]
            scalars.update({"charts/episodes": count, "charts/episodic_return": ended["return"] / count,
                            "charts/episodic_length": ended["length"] / count,
                            **{f"charts/{kind}_rate": ended[kind] / count
                               for kind in ("success", "exception", "time_out")}})
        for name in [k for k in scalars if k.startswith("rewards/")]:  # per env step of one env
            scalars[name] /= self.per_iteration
        return scalars
