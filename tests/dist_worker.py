"""Worker of the sharded-training tests, run by torchrun in every process:

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/dist_worker.py CASE OUT

Each rank writes ``OUT/<case>_<rank>.pt`` with what the test compares (plain tensors and
numbers). Not collected by pytest (no ``test_`` prefix).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from splatforge.raster import rasterize
from splatforge.raster.collectives import World, all_to_all, exchange
from splatforge.train.distributed import even_sizes, finish, gather_rows, init_from_env, move_rows, offsets


def _rows(rank: int, dst: int, n: int) -> torch.Tensor:
    """The rows rank ``rank`` sends to ``dst``: values that name their origin."""
    return torch.arange(n * 3, dtype=torch.float32).reshape(n, 3) + 1000 * rank + 100 * dst


def case_exchange(world: World, out: Path) -> dict:
    """Variable-sized all-to-all (native and point-to-point), its backward, gather and move."""
    W, r = world.size, world.rank
    counts = [[(2 * a + 3 * b) % 5 for b in range(W)] for a in range(W)]  # counts[a][b]: rows a sends to b
    send = [_rows(r, d, counts[r][d]) for d in range(W)]
    result = {}
    for method in ("native", "p2p"):
        leaves = [t.clone().requires_grad_(True) for t in send]
        recv = all_to_all(leaves, [counts[a][r] for a in range(W)], method=method)
        weights = [torch.full_like(t, 1.0 + a + 10.0 * r) for a, t in enumerate(recv)]  # names sender a and receiver r
        sum((t * w).sum() for t, w in zip(recv, weights)).backward()
        result[method] = {
            "recv": [t.detach() for t in recv],
            "grad": [t.grad if t.grad is not None else torch.zeros_like(t) for t in leaves],
        }
    sizes = [3 + 2 * a for a in range(W)]
    mine = torch.arange(sizes[r], dtype=torch.float32) + offsets(sizes)[r]
    result["gathered"] = gather_rows(mine, sizes, world)
    target = even_sizes(sum(sizes), W, align=1)
    result["moved"] = move_rows(mine, sizes, target, world)
    result["target"] = target
    result["empty"] = exchange([torch.zeros(0, 3)] * W, [0] * W, world.group)
    return result


def _scene(N: int, C: int):
    g = torch.Generator().manual_seed(0)
    means = torch.randn(N, 3, generator=g) * 0.5
    means[:, 2] += 3.0
    quats = torch.randn(N, 4, generator=g)
    scales = torch.rand(N, 3, generator=g) * 0.1 + 0.02
    opacities = torch.rand(N, generator=g) * 0.8 + 0.1
    sh = torch.randn(N, 16, 3, generator=g) * 0.3
    viewmats = torch.eye(4).repeat(C, 1, 1)
    viewmats[:, 0, 3] = torch.linspace(-0.3, 0.3, C)
    viewmats[:, 1, 3] = torch.linspace(0.2, -0.2, C)
    Ks = torch.tensor([[60.0, 0, 32], [0, 60.0, 24], [0, 0, 1]]).repeat(C, 1, 1)
    weights = torch.rand(C, 48, 64, 4, generator=g)
    return (means, quats, scales, opacities, sh), viewmats, Ks, weights


def case_rasterize(world: World, out: Path) -> dict:
    """This rank's shard of a random scene rendered distributed into its two cameras, with the
    gradients of a weighted sum of the images, and the same from one process's full render."""
    W, r = world.size, world.rank
    N, per = 400, 2
    tensors, viewmats, Ks, weights = _scene(N, per * W)
    sizes = even_sizes(N, W)
    lo = offsets(sizes)[r]
    own = slice(lo, lo + sizes[r])
    cams = slice(r * per, (r + 1) * per)
    result = {"own": (lo, sizes[r])}
    full = [t.clone().requires_grad_(True) for t in tensors]
    img, alpha, _ = rasterize(*full, viewmats, Ks, 64, 48, sh_degree=3, render_mode="RGB+ID", backend="cpu")
    ((img * weights).sum() + alpha.sum()).backward()
    result["single"] = {"img": img[cams].detach(), "grads": [t.grad[own] for t in full]}
    shard = [t[own].clone().requires_grad_(True) for t in tensors]
    img_d, alpha_d, info = rasterize(
        *shard, viewmats[cams], Ks[cams], 64, 48, sh_degree=3, render_mode="RGB+ID", backend="cpu", distributed=True
    )
    info["means2d"].retain_grad()
    ((img_d * weights[cams]).sum() + alpha_d.sum()).backward()
    result["dist"] = {
        "img": img_d.detach(),
        "grads": [t.grad for t in shard],
        "means2d": list(info["means2d"].shape),
        "n_cameras": info["n_cameras"],
        "counts": info["gaussian_counts"],
        "means2d_grad": info["means2d"].grad is not None,
    }
    return result


def case_rebalance(world: World, out: Path) -> dict:
    """A trainer whose shards drifted apart (rank 1 lost a third of its Gaussians, with their
    Adam moments) is evened out: the whole run, gathered, is unchanged."""
    from splatforge.model import cap_gaussians
    from splatforge.train import Trainer
    from splatforge.train.config import TrainConfig

    data = Path(sys.argv[3])
    cfg = TrainConfig(data=data, output=out / "rebalance_run", data_factor=8, steps=10, strategy="none", device="cpu")
    trainer = Trainer(cfg, world=world)
    for _ in range(2):
        trainer.train_step()
    if world.rank == 1:
        cap_gaussians(trainer.params, trainer.optimizers, trainer.strategy_state, 2 * len(trainer.params["means"]) // 3)
    before_sizes = [len(trainer.params["means"])]
    state = trainer.state_dict()
    trainer._rebalance()
    after = trainer.state_dict()
    trainer.train_step()  # the moved parameters and moments still train
    return {"before": state, "after": after, "sizes": before_sizes + [len(trainer.params["means"])]}


def main() -> int:
    case, out = sys.argv[1], Path(sys.argv[2])
    world, _ = init_from_env("cpu")
    result = globals()[f"case_{case}"](world, out)
    torch.save(result, out / f"{case}_{world.rank}.pt")
    finish(world)
    return 0


if __name__ == "__main__":
    sys.exit(main())
