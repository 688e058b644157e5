"""What exact-resume and distributed tests compare: a snapshot's or checkpoint's learned state as flat tensors."""
import torch


def learned_state(state) -> list:
    """Actors, critic, ValueNorm and every optimizer's state (Adam moments and steps), in a fixed order."""
    tensors = [t for sd in state["actors"] + [state["critic"], state["value_norm"]] for t in sd.values()]
    for optimizer in state["actor_optimizers"] + [state["critic_optimizer"]]:
        tensors += [v for s in optimizer["state"].values() for v in s.values() if torch.is_tensor(v)]
    return tensors


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))
