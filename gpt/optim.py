"""The optimizer: Muon for the transformer's matrices, AdamW for the embedding and the head.

    optimizer = build_optimizer(model)
    for step in range(num_iterations):
        ...backward...
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lr_multiplier(step, num_iterations)
            if group["kind"] == "muon":
                group["momentum"] = muon_momentum(step)
                group["weight_decay"] = weight_decay_at(step, num_iterations, weight_decay)
        optimizer.step()               # also averages gradients across ranks: no DDP, no all_reduce in the loop
        model.zero_grad(set_to_none=True)

Why Muon: for a weight matrix the steepest-descent direction under the
spectral norm is the gradient's orthogonal factor U V^T (all singular values
set to 1). Muon takes Nesterov momentum of the gradient and orthogonalises it
with a few Newton-Schulz iterations in bf16; this trains the hidden matrices
markedly faster than AdamW at the same tokens. Embedding and head are not
"matrices acting on activations" in that sense and stay on AdamW.

One class for 1 and N ranks (ZeRO-2 style, torch.distributed initialised
with world_size > 1 switches it on):
- AdamW params: gradients reduce-scattered (averaged) along dim 0, each rank
  updates its slice and keeps Adam moments for that slice only, then the
  slices are all-gathered. Params too small (< 1,024 elements) or whose first
  dim does not divide by the world size are all-reduced and updated whole on
  every rank (their state is then replicated).
- Muon params, one group per shape: the K same-shape gradients are stacked,
  zero-padded to a multiple of the world size and reduce-scattered, so rank r
  owns the contiguous block of ceil(K/W) matrices starting at r*ceil(K/W);
  it orthogonalises those, applies the update to its copies, and the new
  matrices are all-gathered.
All reductions are launched before any compute, and every gather right after
its update, so communication overlaps computation. Optimizer state is
sharded: `shard_state()` returns exactly this rank's part, and
`load_resharded_state()` loads the parts saved by any number of ranks into
this run's layout (resume on another number of GPUs).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

# Params smaller than this are all-reduced and updated whole: slicing them is not worth a collective each.
MIN_SHARD_NUMEL = 1024
# Quintic Newton-Schulz coefficients (a, b, c), tuned so that 5 steps from a Frobenius-normalised matrix push
# every singular value into roughly [0.7, 1.2]: not exactly 1, but as good for training and much faster to reach.
NS_COEFFS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def orthogonalize(G: torch.Tensor, steps: int = NS_STEPS) -> torch.Tensor:
    """Approximate U V^T of G = U S V^T (batched over leading dims) by Newton-Schulz iterations in bf16.

    Each step maps every singular value s to a*s + b*s^3 + c*s^5. Iterating on X X^T of the wide
    orientation keeps those Gram matrices as small as possible, so tall matrices are transposed.
    """
    a, b, c = NS_COEFFS
    X = G.bfloat16()
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT
    # The iteration converges only for singular values <= 1: the Frobenius norm bounds the spectral one.
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    if tall:
        X = X.mT
    return X


def adamw_update_(p, g, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay):
    """One AdamW step in place, the same arithmetic as torch.optim.AdamW (single-tensor path).

    `step` is a 0-d fp32 tensor, incremented here. Weight decay is decoupled: p <- p (1 - lr wd).
    """
    step += 1
    t = step.item()
    p.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    bias1 = 1 - beta1 ** t
    bias2 = 1 - beta2 ** t
    denom = (exp_avg_sq.sqrt() / math.sqrt(bias2)).add_(eps)
    p.addcdiv_(exp_avg, denom, value=-lr / bias1)


def muon_update_(p, g, buf, lr, momentum, weight_decay):
    """One Muon step on a stack of same-shape matrices p, g, buf of shape (k, rows, cols), in place on p and buf."""
    buf.lerp_(g, 1 - momentum)
    g = g.lerp(buf, momentum)  # Nesterov: look ahead along the momentum
    update = orthogonalize(g)
    # An orthogonal (rows x cols) matrix has RMS entry 1/sqrt(max dim); this keeps tall matrices' updates comparable.
    scale = max(1.0, p.size(-2) / p.size(-1)) ** 0.5
    p.mul_(1 - lr * weight_decay)
    p.add_(update.to(p.dtype), alpha=-lr * scale)


class MuonAdamW(torch.optim.Optimizer):
    """Param groups carry "kind": "muon" (lr, momentum, weight_decay; all params of one shape) or
    "adamw" (lr, betas, eps, weight_decay), and "names" (one per param, used to name saved state).
    """

    def __init__(self, param_groups: list[dict]):
        defaults = dict(lr=0.02, momentum=0.95, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0)
        super().__init__(param_groups, defaults)
        for gi, group in enumerate(self.param_groups):
            if group.get("kind") not in ("muon", "adamw"):
                raise ValueError(f"param group {gi} needs kind 'muon' or 'adamw', got {group.get('kind')!r}")
            group.setdefault("names", [f"group{gi}.param{i}" for i in range(len(group["params"]))])
            group.setdefault("initial_lr", group["lr"])
            if group["kind"] == "muon":
                shapes = {tuple(p.shape) for p in group["params"]}
                if len(shapes) != 1 or len(next(iter(shapes))) != 2:
                    raise ValueError(f"a muon group holds 2-D matrices of one shape, got shapes {sorted(shapes)}")

    def set_muon_momentum(self, momentum: float):
        for group in self.param_groups:
            if group["kind"] == "muon":
                group["momentum"] = momentum

    # ---- who owns what ---------------------------------------------------------------------------

    @staticmethod
    def _adamw_sliced(p, world: int) -> bool:
        return world > 1 and p.numel() >= MIN_SHARD_NUMEL and p.size(0) % world == 0

    @staticmethod
    def _muon_block(n: int, world: int, rank: int) -> tuple[int, int, int]:
        """(matrices per rank, first owned index, number of real matrices owned) for a group of n."""
        per_rank = -(-n // world)
        start = rank * per_rank
        return per_rank, start, max(0, min(n, start + per_rank) - start)

    def _layout(self, world: int, rank: int) -> dict[str, tuple[torch.nn.Parameter, str, tuple[int, ...]]]:
        """Every state tensor this rank holds: name -> (param, key in self.state[param], shape)."""
        out = {}
        for group in self.param_groups:
            if group["kind"] == "adamw":
                for p, name in zip(group["params"], group["names"]):
                    shape = ((p.size(0) // world, *p.shape[1:]) if self._adamw_sliced(p, world) else tuple(p.shape))
                    out[f"adamw.{name}.exp_avg"] = (p, "exp_avg", shape)
                    out[f"adamw.{name}.exp_avg_sq"] = (p, "exp_avg_sq", shape)
                    out[f"adamw.{name}.step"] = (p, "step", ())
            else:
                _, start, owned = self._muon_block(len(group["params"]), world, rank)
                for p, name in zip(group["params"][start:start + owned], group["names"][start:start + owned]):
                    out[f"muon.{name}.momentum_buffer"] = (p, "momentum_buffer", tuple(p.shape))
        return out

    def _ensure_state(self, world: int, rank: int):
        for p, key, shape in self._layout(world, rank).values():
            if key not in self.state[p]:
                self.state[p][key] = torch.zeros(shape, dtype=torch.float32, device=p.device)

    # ---- the step --------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("MuonAdamW.step does not take a closure")
        world, rank = _world()
        self._ensure_state(world, rank)
        # Phase 1: launch every gradient reduction (async). Phase 2: as each lands, update what this
        # rank owns and launch the gather of the result. Phase 3: wait for the gathers, copy back.
        # Every rank walks the groups in the same order, so the collectives match up.
        reduced = []
        for group in self.param_groups:
            if group["kind"] == "adamw":
                reduced += [self._adamw_reduce(group, p, world, rank) for p in group["params"]]
            else:
                reduced.append(self._muon_reduce(group, world, rank))
        gathers = [update() for update in reduced]
        for finish in gathers:
            finish()

    def _adamw_reduce(self, group, p, world, rank):
        """Launch the reduction of p's gradient; return update(), which returns finish()."""
        g = p.grad if p.grad is not None else torch.zeros_like(p)  # a missing gradient counts as zero
        sliced = self._adamw_sliced(p, world)
        work = None
        if sliced:
            g_own = torch.empty((p.size(0) // world, *p.shape[1:]), dtype=g.dtype, device=g.device)
            work = dist.reduce_scatter_tensor(g_own, g.contiguous(), op=dist.ReduceOp.AVG, async_op=True)
        elif world > 1:
            g_own = g.clone()
            work = dist.all_reduce(g_own, op=dist.ReduceOp.AVG, async_op=True)
        else:
            g_own = g

        def update():
            if work is not None:
                work.wait()
            state = self.state[p]
            beta1, beta2 = group["betas"]
            hyper = dict(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"])
            if not sliced:  # one rank, or a replicated small param: update it whole, in place
                adamw_update_(p, g_own, state["exp_avg"], state["exp_avg_sq"], state["step"], **hyper)
                return lambda: None
            n = p.size(0) // world
            mine = p[rank * n:(rank + 1) * n].clone()
            adamw_update_(mine, g_own, state["exp_avg"], state["exp_avg_sq"], state["step"], **hyper)
            gather = dist.all_gather_into_tensor(p, mine, async_op=True)
            return gather.wait

        return update

    def _muon_reduce(self, group, world, rank):
        """Launch the reduction of a same-shape group's stacked gradients; return update(), which returns finish()."""
        params = group["params"]
        per_rank, start, owned = self._muon_block(len(params), world, rank)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        p0 = params[0]
        # (per_rank * world, rows, cols): the stacked gradients, zero-padded; later the gathered new params.
        full = torch.zeros((per_rank * world, *p0.shape), dtype=p0.dtype, device=p0.device)
        torch.stack(grads, out=full[:len(params)])
        work = None
        if world > 1:
            g_own = torch.empty((per_rank, *p0.shape), dtype=p0.dtype, device=p0.device)
            work = dist.reduce_scatter_tensor(g_own, full, op=dist.ReduceOp.AVG, async_op=True)
        else:
            g_own = full

        def update():
            if work is not None:
                work.wait()
            if owned:
                mine = params[start:start + owned]
                bufs = [self.state[p]["momentum_buffer"] for p in mine]
                new, momentum = torch.stack(mine), torch.stack(bufs)
                muon_update_(new, g_own[:owned], momentum, group["lr"], group["momentum"], group["weight_decay"])
                torch._foreach_copy_(bufs, list(momentum.unbind(0)))
                g_own[:owned].copy_(new)  # the gradient block becomes the block of new matrices to gather
            if world == 1:
                return lambda: torch._foreach_copy_(params, list(full[:len(params)].unbind(0)))
            gather = dist.all_gather_into_tensor(full, g_own, async_op=True)

            def finish():
                gather.wait()
                torch._foreach_copy_(params, list(full[:len(params)].unbind(0)))

            return finish

        return update

    # ---- saving and loading this rank's shard --------------------------------------------------

    def shard_state(self) -> dict[str, torch.Tensor]:
        """This rank's optimizer state as named, contiguous, unshared tensors (for safetensors).

        State not created yet (no step taken) is written as zeros, which is what a first step would
        start from. "world_size" and "rank" are recorded so a resume on another layout is refused.
        """
        world, rank = _world()
        self._ensure_state(world, rank)
        out = {"world_size": torch.tensor(world, dtype=torch.int64), "rank": torch.tensor(rank, dtype=torch.int64)}
        for name, (p, key, _) in self._layout(world, rank).items():
            out[name] = self.state[p][key].detach().clone().contiguous()
        return out

    def load_shard_state(self, tensors: dict[str, torch.Tensor]):
        """Inverse of shard_state(); every name and shape must match this rank's layout."""
        world, rank = _world()
        saved_world = int(tensors["world_size"]) if "world_size" in tensors else None
        if saved_world is not None and saved_world != world:
            raise ValueError(f"optimizer state was saved by a run with {saved_world} ranks, this run has {world}: "
                             "give every rank's shard to load_resharded_state to load it on another number of ranks")
        if "rank" in tensors and int(tensors["rank"]) != rank:
            raise ValueError(f"optimizer state of rank {int(tensors['rank'])} was given to rank {rank}; load optim_rank{rank}")
        layout = self._layout(world, rank)
        _check_fits({n: tuple(t.shape) for n, t in tensors.items() if n not in ("world_size", "rank")}, layout)
        for name, (p, key, _) in layout.items():
            self.state[p][key] = tensors[name].detach().to(device=p.device, dtype=torch.float32).clone()

    def load_resharded_state(self, shards: list):
        """Load the state that a run on len(shards) ranks saved into this rank's share of this run's layout.

        shards[r] is rank r's shard_state(): a dict, or an open safetensors file (safe_open), from which only
        the rows and matrices this rank owns are read. Where state lives is the only thing that depends on
        the number of ranks: an AdamW moment is rows of the whole moment (or a replicated copy), a Muon
        momentum belongs to one matrix, step counters are equal everywhere. So the result is exactly the
        state this run's ranks would hold had they trained from the start.
        """
        saved_world = len(shards)
        world, rank = _world()
        for r, shard in enumerate(shards):
            tags = {k: int(_read(shard, k)) for k in ("world_size", "rank") if k in shard.keys()}
            if tags.get("world_size", saved_world) != saved_world or tags.get("rank", r) != r:
                raise ValueError(f"optimizer shard {r} of {saved_world} says it is rank {tags.get('rank')} of "
                                 f"{tags.get('world_size')}; pass optim_rank0 .. optim_rank{saved_world - 1} of one checkpoint, in order")
            _check_fits({n: _shape(shard, n) for n in shard.keys() if n not in ("world_size", "rank")},
                        self._layout(saved_world, r), f"optimizer shard of rank {r}")
        out = {"world_size": torch.tensor(world, dtype=torch.int64), "rank": torch.tensor(rank, dtype=torch.int64)}
        for group in self.param_groups:
            if group["kind"] == "adamw":
                for p, name in zip(group["params"], group["names"]):
                    rows = self._adamw_rows(p, world, rank)
                    for key in ("exp_avg", "exp_avg_sq"):
                        out[f"adamw.{name}.{key}"] = self._read_adamw_rows(shards, f"adamw.{name}.{key}", p, rows)
                    out[f"adamw.{name}.step"] = _read(shards[0], f"adamw.{name}.step")
            else:
                n = len(group["params"])
                saved_per_rank = self._muon_block(n, saved_world, 0)[0]
                _, start, owned = self._muon_block(n, world, rank)
                for i in range(start, start + owned):  # matrix i lived on the rank whose block holds it
                    key = f"muon.{group['names'][i]}.momentum_buffer"
                    out[key] = _read(shards[i // saved_per_rank], key)
        self.load_shard_state(out)

    def _adamw_rows(self, p, world: int, rank: int) -> tuple[int, int]:
        """The rows [a, b) of p's AdamW moments that `rank` of `world` holds."""
        if not self._adamw_sliced(p, world):
            return 0, p.size(0)
        n = p.size(0) // world
        return rank * n, (rank + 1) * n

    def _read_adamw_rows(self, shards: list, key: str, p, rows: tuple[int, int]) -> torch.Tensor:
        """Rows [a, b) of a whole AdamW moment, put together from the shards that hold them."""
        saved_world = len(shards)
        a, b = rows
        if not self._adamw_sliced(p, saved_world):  # every rank held it whole: rank 0's copy will do
            return _read(shards[0], key, rows)
        n = p.size(0) // saved_world
        parts = [_read(shards[q], key, (max(a, q * n) - q * n, min(b, (q + 1) * n) - q * n))
                 for q in range(a // n, -(-b // n))]
        return torch.cat(parts)


def _read(shard, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """A saved tensor, or its rows [a, b): from a dict, or from a safe_open file without reading the rest."""
    if isinstance(shard, dict):
        t = shard[name]
        return t if rows is None else t[rows[0]:rows[1]]
    return shard.get_tensor(name) if rows is None else shard.get_slice(name)[rows[0]:rows[1]]


def _shape(shard, name: str) -> tuple[int, ...]:
    return tuple(shard[name].shape) if isinstance(shard, dict) else tuple(shard.get_slice(name).get_shape())


def _check_fits(shapes: dict[str, tuple], layout: dict, what: str = "optimizer state"):
    """Refuse state whose names or shapes are not those of `layout`, saying what differs."""
    missing, unexpected = sorted(set(layout) - set(shapes)), sorted(set(shapes) - set(layout))
    wrong = [f"{n}: saved {shapes[n]}, expected {layout[n][2]}"
             for n in sorted(shapes.keys() & layout.keys()) if shapes[n] != layout[n][2]]
    if missing or unexpected or wrong:
        raise ValueError(f"{what} does not fit this model/optimizer"
                         + (f"; missing {missing[:4]}" if missing else "")
                         + (f"; unexpected {unexpected[:4]}" if unexpected else "")
                         + (f"; wrong shapes {wrong[:4]}" if wrong else "")
                         + " (was it saved with a different depth, vocabulary or number of ranks?)")


def build_optimizer(model, *, matrix_lr: float = 0.02, embedding_lr: float = 0.2, unembedding_lr: float = 0.004,
                    weight_decay: float = 0.0, adam_betas: tuple[float, float] = (0.8, 0.95)) -> MuonAdamW:
    """Muon for every matrix inside the transformer blocks (one group per shape), AdamW for wte and lm_head.

    The AdamW learning rates were tuned at width 768 and are scaled by (n_embd / 768) ** -0.5:
    wider models have larger fan-in, and Adam's per-coordinate steps would otherwise grow the
    output too fast. weight_decay is Muon's (decoupled, schedule it with weight_decay_at); AdamW has none.
    """
    scale = (model.config.n_embd / 768) ** -0.5
    named = dict(model.named_parameters())
    by_shape: dict[tuple, list[str]] = {}
    for name, p in named.items():
        if name.startswith("transformer.h.") and p.ndim == 2:
            by_shape.setdefault(tuple(p.shape), []).append(name)
    groups = [
        dict(kind="adamw", params=[named["lm_head.weight"]], names=["lm_head.weight"], lr=unembedding_lr * scale,
             betas=adam_betas, eps=1e-10, weight_decay=0.0),
        dict(kind="adamw", params=[named["transformer.wte.weight"]], names=["transformer.wte.weight"],
             lr=embedding_lr * scale, betas=adam_betas, eps=1e-10, weight_decay=0.0),
    ]
    for shape, names in by_shape.items():
        groups.append(dict(kind="muon", params=[named[n] for n in names], names=names, lr=matrix_lr, momentum=0.95,
                           weight_decay=weight_decay))
    covered = {n for g in groups for n in g["names"]}
    if covered != set(named):
        raise ValueError(f"build_optimizer does not know where to put {sorted(set(named) - covered)}; add them to a group")
    for g in groups:
        g["initial_lr"] = g["lr"]
    return MuonAdamW(groups)


def lr_multiplier(step: int, num_iterations: int, warmup_steps: int = 0, warmdown_ratio: float = 0.2,
                  final_lr_frac: float = 0.0) -> float:
    """Linear warmup over warmup_steps ((step+1)/warmup_steps), 1.0, then a linear warmdown over the last
    warmdown_ratio of the steps, reaching final_lr_frac at step == num_iterations. Where warmup and
    warmdown overlap (very short runs) the smaller factor wins."""
    warm = (step + 1) / warmup_steps if step < warmup_steps else 1.0
    warmdown_steps = round(warmdown_ratio * num_iterations)
    down = 1.0
    if warmdown_steps > 0 and step > num_iterations - warmdown_steps:
        progress = max(0.0, (num_iterations - step) / warmdown_steps)  # 1 at the start of the warmdown, 0 at the end
        down = progress + (1 - progress) * final_lr_frac
    return min(warm, down)


def muon_momentum(step: int, warmup_steps: int = 300, start: float = 0.85, end: float = 0.95) -> float:
    """Muon's momentum, linear from start to end over the first warmup_steps: less inertia while the
    gradients are large and changing fast."""
    frac = min(step / warmup_steps, 1.0) if warmup_steps > 0 else 1.0
    return (1 - frac) * start + frac * end


def weight_decay_at(step: int, num_iterations: int, weight_decay: float) -> float:
    """Muon's decoupled weight decay, decayed linearly from weight_decay at step 0 to 0 at num_iterations
    (the applied decay is lr * wd, and the lr schedule already decays too)."""
    if num_iterations <= 0:
        return weight_decay
    return weight_decay * max(0.0, 1 - step / num_iterations)
