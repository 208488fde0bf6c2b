"""Pretraining end to end on CPU: loss falls, resume is exact, N ranks equal 1 rank with accumulation."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import REPO, free_port, mirror
from trainer import tok_train
from pipeline.events import read_events

# A model small enough for CPU tests: depth 2, width 64 (one head of 64), context 64.
TINY = ["--depth", "2", "--aspect-ratio", "32", "--head-dim", "64", "--max-seq-len", "64",
        "--device-batch-size", "4", "--device", "cpu", "--dtype", "float32", "--compile", "no",
        "--eval-every", "0", "--eval-tokens", "2048", "--sample-every", "0", "--save-every", "0",
        "--loader-threads", "1", "--matrix-lr", "0.02", "--embedding-lr", "0.1", "--unembedding-lr", "0.01"]


def env():
    e = {**os.environ, "NANOSTUDIO_DATA_MIRROR": str(mirror()), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    e.pop("RANK", None)
    e.pop("WORLD_SIZE", None)
    return e


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    os.environ["NANOSTUDIO_DATA_MIRROR"] = str(mirror())
    run = tmp_path_factory.mktemp("tokrun")
    assert tok_train.main(["--run-dir", str(run), "--vocab-size", "512", "--max-chars", "400000"]) == 0
    return run / "tokenizer"


@pytest.fixture
def new_run(tmp_path, tokenizer_dir):
    def make(name="run"):
        run = tmp_path / name
        shutil.copytree(tokenizer_dir, run / "tokenizer")
        return run
    return make


def train(run, *extra, launcher=(), check=True, timeout=600):
    cmd = [*launcher, "-m", "trainer.base_train", "--run-dir", str(run), *TINY, *extra]
    if not launcher:
        cmd = [sys.executable, *cmd]
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def losses(run):
    events, _ = read_events(run)
    return {e["step"]: e["loss"] for e in events if e.get("stage") == "base_train" and e["kind"] == "metric"}


def torchrun(nproc, nnodes=1, port=None, rdzv_id="t"):
    base = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    if nnodes == 1:
        return base + ["--standalone"] if port is None else base + [f"--master_port={port}", "--master_addr=127.0.0.1"]
    return base + [f"--nnodes={nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
                   f"--rdzv-id={rdzv_id}", "--rdzv-conf=join_timeout=60"]


def test_loss_falls_and_the_stage_reports_everything(new_run):
    run = new_run()
    train(run, "--total-batch-size", "256", "--num-iterations", "40", "--eval-every", "20", "--sample-every", "40",
          "--save-every", "20")
    events, _ = read_events(run)
    mine = [e for e in events if e["stage"] == "base_train"]
    kinds = {e["kind"] for e in mine}
    assert {"stage_start", "setup", "metric", "eval", "sample", "checkpoint", "result", "stage_end"} <= kinds
    steps = losses(run)
    assert sorted(steps) == list(range(1, 41))
    assert sum(list(steps.values())[-5:]) / 5 < steps[1] - 1.0  # ln(512) = 6.24 at the start
    evals = [e for e in mine if e["kind"] == "eval"]
    assert [e["step"] for e in evals] == [0, 20, 40] and evals[-1]["val_bpb"] < evals[0]["val_bpb"]
    metric = next(e for e in mine if e["kind"] == "metric")
    for key in ("loss", "smooth_loss", "lrm", "dt", "tok_per_sec", "peak_mem_mb"):
        assert key in metric
    ckpts = sorted(p.name for p in (run / "checkpoints" / "base_train").iterdir())
    assert ckpts == ["step_000020", "step_000040"]
    files = {p.name for p in (run / "checkpoints" / "base_train" / "step_000040").iterdir()}
    assert files == {"model.safetensors", "optim_rank0.safetensors", "loader_rank0.json", "meta.json"}
    assert mine[-1]["kind"] == "stage_end" and mine[-1]["status"] == "done"


def test_resume_continues_exactly(new_run):
    straight, paused = new_run("straight"), new_run("paused")
    common = ["--total-batch-size", "512", "--num-iterations", "8", "--warmup-steps", "2"]  # accumulation 2
    train(straight, *common)
    first = train(paused, *common, "--stop-after-step", "3", check=False)
    assert first.returncode == 75, first.stderr[-2000:]
    assert sorted(losses(paused)) == [1, 2, 3]
    # A newer step folder that a kill inside an old cleanup left with meta.json but no weights: skipped, and said so.
    ckpts = paused / "checkpoints" / "base_train"
    broken = ckpts / "step_000006"
    shutil.copytree(ckpts / "step_000003", broken)
    (broken / "model.safetensors").unlink()
    meta = json.loads((ckpts / "step_000003" / "meta.json").read_text())
    (broken / "meta.json").write_text(json.dumps({**meta, "step": 6}))
    resumed = train(paused, *common, "--resume")
    assert "skipping step_000006, which lacks model.safetensors" in resumed.stdout
    a, b = losses(straight), losses(paused)
    assert sorted(b) == list(range(1, 9))
    for step in range(1, 9):
        assert b[step] == pytest.approx(a[step], abs=1e-5), (step, a, b)
    resume = [e for e in read_events(paused)[0] if e["kind"] == "resume"]
    assert len(resume) == 1 and resume[0]["step"] == 3 and resume[0]["checkpoint"].endswith("step_000003")
    assert resume[0]["skipped"] == [{"checkpoint": str(broken), "missing": ["model.safetensors"]}]
    assert not broken.exists()  # the final save's cleanup removed it


def test_sigterm_saves_a_checkpoint_and_exits_75(new_run):
    run = new_run()
    proc = subprocess.Popen([sys.executable, "-m", "trainer.base_train", "--run-dir", str(run), *TINY,
                             "--total-batch-size", "256", "--num-iterations", "100000"],
                            cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(losses(run)) < 3:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, out[-2000:]
    ckpts = list((run / "checkpoints" / "base_train").iterdir())
    assert len(ckpts) == 1 and (ckpts[0] / "meta.json").exists()
    saved = json.loads((ckpts[0] / "meta.json").read_text())["step"]
    assert saved == max(losses(run))
    events, _ = read_events(run)
    assert events[-1]["kind"] == "stage_end" and events[-1]["status"] == "interrupted"


@pytest.mark.slow
def test_two_ranks_equal_one_rank_with_two_accumulation_steps(new_run):
    single, double = new_run("single"), new_run("double")
    common = ["--total-batch-size", "512", "--num-iterations", "5"]
    train(single, *common)  # 1 rank x 2 micro-steps
    train(double, *common, launcher=torchrun(2, port=free_port()))  # 2 ranks x 1 micro-step
    a, b = losses(single), losses(double)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5]
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=2e-4), (a, b)
    # each rank wrote its own optimizer shard and data position; rank 0 alone wrote the weights
    ckpt = double / "checkpoints" / "base_train" / "step_000005"
    assert {p.name for p in ckpt.iterdir()} == {"model.safetensors", "meta.json", "optim_rank0.safetensors",
                                                "optim_rank1.safetensors", "loader_rank0.json", "loader_rank1.json"}


def final_weights(run, step):
    from safetensors.torch import load_file

    return load_file(str(run / "checkpoints" / "base_train" / f"step_{step:06d}" / "model.safetensors"))


def assert_same_training(a_run, b_run, steps):
    """Losses per step within the N-ranks-vs-accumulation tolerance, and the final weights close."""
    import torch

    a, b = losses(a_run), losses(b_run)
    assert sorted(a) == sorted(b) == list(range(1, steps + 1)), (a, b)
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=2e-4), (step, a, b)
    wa, wb = final_weights(a_run, steps), final_weights(b_run, steps)
    assert set(wa) == set(wb)
    # The same summation-order noise as the loss: bf16 Newton-Schulz magnifies it a little (see test_optim).
    diff = torch.cat([(wa[n] - wb[n]).flatten() for n in wa]).norm() / torch.cat([wa[n].flatten() for n in wa]).norm()
    assert diff < 1e-3, diff


@pytest.mark.slow
@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_a_run_paused_on_n_ranks_resumes_on_another_count(new_run, before, after):
    """2 ranks x 1 micro-step paused, resumed on 1 rank x 2 (and the reverse), equals the run that never paused."""
    straight, moved = new_run("straight"), new_run("moved")
    common = ["--total-batch-size", "512", "--num-iterations", "6"]  # 2 data streams of 4 x 64 tokens

    def launcher(ranks):
        return torchrun(2, port=free_port()) if ranks == 2 else ()

    train(straight, *common, launcher=launcher(before))
    first = train(moved, *common, "--stop-after-step", "3", launcher=launcher(before), check=False)
    # the stage exits 75 (paused); torchrun reports a child's non-zero exit as its own failure (1)
    assert first.returncode == (75 if before == 1 else 1), first.stdout[-2000:] + first.stderr[-2000:]
    assert read_events(moved)[0][-1]["status"] == "interrupted" and sorted(losses(moved)) == [1, 2, 3]
    resumed = train(moved, *common, "--resume", launcher=launcher(after))
    message = f"resumed at step 3 on {after} ranks (was {before}), accumulation {2 // before} → {2 // after}"
    assert message in resumed.stdout
    resume = next(e for e in read_events(moved)[0] if e["kind"] == "resume")
    assert (resume["world_size"], resume["saved_world_size"], resume["grad_accum"], resume["saved_grad_accum"]) == \
        (after, before, 2 // after, 2 // before)
    assert_same_training(straight, moved, 6)
    files = {p.name for p in (moved / "checkpoints" / "base_train" / "step_000006").iterdir()}
    assert {f"optim_rank{r}.safetensors" for r in range(after)} <= files and f"optim_rank{after}.safetensors" not in files


def test_resume_on_a_rank_count_that_does_not_divide_the_streams_names_the_valid_ones():
    from trainer import base_train

    args = base_train.parse_args(["--run-dir", "x", "--device-batch-size", "4", "--max-seq-len", "64",
                                  "--total-batch-size", str(8 * 4 * 64)])
    meta = {"world_size": 8, "args": vars(args)}  # 8 ranks x 1 micro-step: 8 streams
    for world in (1, 2, 4, 8):
        base_train.check_resume_world(meta, args, world)
    with pytest.raises(RuntimeError, match=r"8 micro-batch streams \(8 ranks x 1 accumulation steps\); resume on a "
                                           r"number of ranks that divides 8: 1, 2, 4, 8 \(this run has 3\)"):
        base_train.check_resume_world(meta, args, 3)
    other = base_train.parse_args(["--run-dir", "x", "--device-batch-size", "8", "--max-seq-len", "64",
                                   "--total-batch-size", str(8 * 4 * 64)])
    with pytest.raises(RuntimeError, match="trained with --device-batch-size 4, this run has 8; resume with the same value"):
        base_train.check_resume_world(meta, other, 4)


def test_resumed_streams_keep_every_stream_on_any_split():
    from trainer import base_train

    saved = [{"streams": ["s0", "s1"]}, {"streams": ["s2", "s3"]}]  # 2 ranks x 2 micro-steps: stream = rank * 2 + k
    assert base_train.resumed_streams(saved, 0, 4) == ["s0", "s1", "s2", "s3"]  # 1 rank x 4
    assert [base_train.resumed_streams(saved, r, 1) for r in range(4)] == [["s0"], ["s1"], ["s2"], ["s3"]]  # 4 x 1
    assert base_train.resumed_streams(saved, 1, 2) == ["s2", "s3"]
    with pytest.raises(RuntimeError, match="no data position for rank 1"):
        base_train.resumed_streams([saved[0], None], 0, 4)


@pytest.mark.slow
def test_two_nodes_on_localhost_equal_the_single_node_run(new_run):
    single, multi = new_run("single"), new_run("multi")
    common = ["--total-batch-size", "512", "--num-iterations", "4", "--save-every", "4"]
    train(single, *common)
    port = free_port()
    launcher = torchrun(1, nnodes=2, port=port, rdzv_id=f"nodes{port}")
    cmd = [*launcher, "-m", "trainer.base_train", "--run-dir", str(multi), *TINY, *common]
    agents = [subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
              for _ in range(2)]
    outs = [a.communicate(timeout=600)[0] for a in agents]
    assert [a.returncode for a in agents] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    a, b = losses(single), losses(multi)
    assert sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=2e-4)
    ckpt = multi / "checkpoints" / "base_train" / "step_000004"
    assert {p.name for p in ckpt.iterdir()} >= {"optim_rank0.safetensors", "optim_rank1.safetensors",
                                                "loader_rank0.json", "loader_rank1.json"}


def test_batch_that_does_not_divide_is_refused_with_the_fix(new_run):
    run = new_run()
    proc = train(run, "--total-batch-size", "1000", "--num-iterations", "2", check=False)
    assert proc.returncode == 1
    assert "not a multiple" in proc.stderr and "--total-batch-size 768" in proc.stderr


def test_bad_flags_and_missing_inputs(new_run, tmp_path):
    proc = train(new_run("a"), "--depth", "0", check=False)
    assert proc.returncode == 2 and "--depth must be at least 1" in proc.stderr
    empty = tmp_path / "no_tokenizer"
    empty.mkdir()
    proc = subprocess.run([sys.executable, "-m", "trainer.base_train", "--run-dir", str(empty), *TINY, "--num-iterations", "1"],
                          cwd=REPO, env=env(), capture_output=True, text=True)
    assert proc.returncode == 1 and "tok_train" in proc.stderr
    bad = tmp_path / "bad_data"
    bad.mkdir()
    for i in range(2):
        (bad / f"shard_{i:05d}.parquet").write_bytes(b"not parquet at all")
    proc = train(new_run("b"), "--total-batch-size", "256", "--num-iterations", "1", "--data-dir", str(bad), check=False)
    assert proc.returncode == 1 and "shard_00000.parquet" in proc.stderr
    proc = train(new_run("c"), "--total-batch-size", "256", "--num-iterations", "2", "--resume", check=False)
    assert proc.returncode == 1 and "no checkpoint" in proc.stderr


def test_checkpoint_rng_state_round_trips():
    import torch

    from gpt import checkpoint

    state = checkpoint.rng_state()
    first = torch.rand(4)
    checkpoint.set_rng_state(json.loads(json.dumps(state)))  # as stored in meta.json
    assert torch.equal(torch.rand(4), first)
