"""Steps MuonAdamW on tiny GPTs, on 1 rank or under torchrun on N ranks (gloo, CPU), for test_optim.py.

    python tests/dist_optim_worker.py OUT                                  # world of 1 (or run_all(OUT))
    python -m torch.distributed.run --nproc_per_node=2 ... tests/dist_optim_worker.py OUT

Every optimizer step consumes MICRO micro-batches; rank r of W computes MICRO/W of them
(accumulating loss / (MICRO/W)), the optimizer averages over ranks. So every world size
computes the same averaged gradient. Writes, per scenario:
    OUT/<scenario>_params.safetensors          final parameters (rank 0)
    OUT/<scenario>_optim_rank<r>.safetensors   each rank's shard_state() after the last step
    OUT/<scenario>_full_params.safetensors     (world 1 only) the same steps on whole batches, no accumulation
    OUT/<scenario>_rank<r>.json                checks done inside the worker (resume from a saved shard)
    OUT/<scenario>_reshard_rank<r>.json        (world > 1) every rank's saved shard, loaded back through
                                               load_resharded_state on the same ranks: the max difference
"""

import json
import os
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from gpt.model import GPTConfig, build_model
from gpt.optim import build_optimizer

SCENARIOS = {
    # GQA, a sliding-window layer, Muon groups of 6 and 3 matrices (3 is padded to 4 on 2 ranks), sliceable AdamW params
    "sliced": GPTConfig(sequence_len=16, vocab_size=128, n_layer=3, n_head=2, n_kv_head=1, n_embd=64, window_pattern="SL"),
    # a vocabulary of 127 rows cannot be sliced over 2 ranks: those params are all-reduced and replicated
    "replicated": GPTConfig(sequence_len=16, vocab_size=127, n_layer=1, n_head=2, n_kv_head=2, n_embd=64),
}
MICRO, BATCH, STEPS = 2, 2, 3


def batches(config, step):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, config.vocab_size, (MICRO, BATCH, config.sequence_len + 1), generator=g)


def backward(model, data):
    for x in data:
        (model(x[:, :-1], x[:, 1:]) / len(data)).backward()


def run(config, world, rank, full=False):
    torch.manual_seed(0)
    model = build_model(config, "cpu")
    opt = build_optimizer(model, matrix_lr=0.05, embedding_lr=0.3, unembedding_lr=0.02, weight_decay=0.1)
    per_rank = MICRO // world
    snapshot = None
    for step in range(STEPS):
        data = batches(config, step)
        if full:
            data = data.reshape(1, MICRO * BATCH, -1)
        else:
            data = data[rank * per_rank:(rank + 1) * per_rank]
        if step == STEPS - 1:
            snapshot = ({k: v.clone() for k, v in model.state_dict().items()}, opt.shard_state(), data)
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * (1.0 - 0.1 * step)
            if group["kind"] == "muon":
                group["momentum"] = 0.85 + 0.05 * step
        backward(model, data)
        opt.step()
        model.zero_grad(set_to_none=True)
    return model, opt, snapshot


def resume_diff(config, snapshot, final_model, final_opt):
    """Rebuild from the snapshot taken before the last step, take that step again: must be identical."""
    params, shard, data = snapshot
    torch.manual_seed(123)  # a different init, fully overwritten by the loaded state
    model = build_model(config, "cpu")
    model.load_state_dict(params)
    opt = build_optimizer(model, matrix_lr=0.05, embedding_lr=0.3, unembedding_lr=0.02, weight_decay=0.1)
    opt.load_shard_state(shard)
    for group, final in zip(opt.param_groups, final_opt.param_groups):
        group["lr"], group["momentum"] = final["lr"], final.get("momentum")
    backward(model, data)
    opt.step()
    diff = max((a - b).abs().max().item() for a, b in zip(model.parameters(), final_model.parameters()))
    state = opt.shard_state()
    sdiff = max((state[k].double() - v.double()).abs().max().item() for k, v in final_opt.shard_state().items())
    return max(diff, sdiff)


def run_all(out, world=1, rank=0):
    for name, config in SCENARIOS.items():
        model, opt, snapshot = run(config, world, rank)
        if rank == 0:
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, f"{out}/{name}_params.safetensors")
        save_file(opt.shard_state(), f"{out}/{name}_optim_rank{rank}.safetensors")
        checks = {"resume_max_diff": resume_diff(config, snapshot, model, opt)}
        if world == 1:
            full, _, _ = run(config, world, rank, full=True)
            save_file({k: v.contiguous() for k, v in full.state_dict().items()}, f"{out}/{name}_full_params.safetensors")
        with open(f"{out}/{name}_rank{rank}.json", "w") as f:
            json.dump(checks, f)


def reshard_same_world(out, world, rank):
    """Load all ranks' saved shards (opened with safe_open, as a resume does) on the same ranks: nothing may change."""
    from contextlib import ExitStack

    from safetensors import safe_open
    from safetensors.torch import load_file

    for name, config in SCENARIOS.items():
        opt = build_optimizer(build_model(config, "cpu"))
        with ExitStack() as files:
            opt.load_resharded_state([files.enter_context(safe_open(f"{out}/{name}_optim_rank{r}.safetensors", framework="pt"))
                                      for r in range(world)])
        saved = load_file(f"{out}/{name}_optim_rank{rank}.safetensors")
        state = opt.shard_state()
        assert set(state) == set(saved), sorted(set(state) ^ set(saved))
        diff = max((state[k].double() - saved[k].double()).abs().max().item() for k in saved)
        with open(f"{out}/{name}_reshard_rank{rank}.json", "w") as f:
            json.dump({"max_diff": diff}, f)


def main():
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    run_all(sys.argv[1], world, rank)
    if world > 1:
        dist.barrier()  # every shard is on disk
        reshard_same_world(sys.argv[1], world, rank)
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
