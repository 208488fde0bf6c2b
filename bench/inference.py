"""Benchmark inference: our Engine (gpt/engine.py) vs HuggingFace transformers generate().

Usage:
    python bench/inference.py                          # CPU: depths 4 and 8, vocab 32768, fp32 (a few minutes)
    python bench/inference.py --depth 4 --dtype bf16 --repeats 5
    python bench/inference.py --device cuda            # on a GPU: depth 20, bf16, and the bandwidth bound

What it compares, all measured in this run, on the same machine, same shapes, random weights:
  * time to first token (TTFT): from the call to the first generated token being in Python's
    hands (prefill + first sample);
  * decode tokens/s: (new tokens - 1) x batch / (time from the first to the last token);
  at batch 1 and batch 8.

The two models:
  * ours: GPTConfig.from_depth(depth, vocab) built by build_model (the zero-initialised output
    projections and head get random values too), run by Engine.generate;
  * the peer: transformers' LlamaForCausalLM with the same hidden size, layers, heads, kv heads,
    vocab and rotary base, untied embeddings, no biases, sdpa attention, the default (dynamic)
    KV cache. Our MLP is ReLU^2 with 2 matrices of 4d; Llama's SwiGLU has 3 matrices, so its
    intermediate size is round(8d/3), which makes the parameter counts equal up to a few
    hundred (printed). Small differences remain and are ours to carry: we also QK-normalise,
    soft-cap the logits and keep the norms, rotary and logits in fp32; Llama's RMSNorms have
    weights (d per norm). Same dtype for both: fp32 on CPU, bf16 on CUDA (ours as autocast over
    fp32 master weights, the way Engine runs in the studio; Llama's weights cast to bf16).
  * batch 8: our API samples num_samples=8 rows from one batch-1 prefill of the prompt; the peer
    gets a batch of 8 identical prompts (it has no such option), so its prefill does 8x the work:
    read its batch-8 TTFT with that in mind.

Exactly N new tokens on both sides, greedy (temperature 0 / do_sample=False), same random prompt:
  * the peer's config has eos_token_id=None, so generate() runs to max_new_tokens;
  * our Engine ends a row when it emits a stop token (<|assistant_end|>, <|bos|>) and starts tool
    calls on <|python_start|>. The bench hands it a stand-in tokenizer whose special(name) returns
    ids >= vocab_size: the model can never sample them (its logits have vocab_size columns), so no
    row stops and no tool runs, yet the engine still does every per-token check it does in
    production. This is the same as the peer's "no EOS". Every run checks that each row got
    exactly N tokens.

Timing: a warm-up run of each engine and batch first, then --repeats runs alternating ours/peer,
median reported. Threads are set explicitly (--threads, default all cores) and printed. On CUDA,
a large device-to-device copy measures the memory bandwidth, and the batch-1 decode rate is
compared to the bandwidth bound: bytes read per step (every Linear weight in the compute dtype,
the head included, + the KV cache at the mean decode position) / bandwidth.

Results print as a table and go to --out as JSON (+ the table as Markdown next to it). Not a
test: nothing asserts on time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from gpt.engine import STOP_TOKENS, Engine  # noqa: E402
from gpt.model import GPTConfig, build_model  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class OutOfVocabSpecials:
    """The part of a tokenizer Engine uses, with every special token outside the model's vocabulary.

    Engine looks up its stop and tool tokens with special(name). Ids >= vocab_size can never be
    sampled, so generation always runs the full max_tokens (like the peer's eos_token_id=None).
    encode/decode are only reached by tool calls, which therefore never happen.
    """

    NAMES = (*STOP_TOKENS, "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>")

    def __init__(self, vocab_size: int):
        self.ids = {name: vocab_size + i for i, name in enumerate(self.NAMES)}

    def special(self, name: str) -> int:
        return self.ids[name]

    def encode(self, text: str) -> list[int]:
        raise AssertionError("no tool call can happen in the benchmark")

    def decode(self, ids: list[int]) -> str:
        raise AssertionError("no tool call can happen in the benchmark")


# ---------------------------------------------------------------------------------------- models

def our_model(config: GPTConfig, device: str) -> torch.nn.Module:
    """Built as the trainer builds it; the zero-initialised projections and head get random values
    too, so no matmul multiplies zeros (speed would not change, but the logits would be all equal)."""
    torch.manual_seed(0)
    model = build_model(config, device).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("c_proj.weight") or name == "lm_head.weight":
                p.normal_(0.0, p.size(1) ** -0.5)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def llama_intermediate(n_embd: int) -> int:
    # ReLU^2 MLP: 2 x d x 4d = 8d^2 weights; SwiGLU: 3 x d x I. Equal when I = 8d/3.
    return round(8 * n_embd / 3)


def peer_model(config: GPTConfig, device: str, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_config = LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.n_embd, intermediate_size=llama_intermediate(config.n_embd),
        num_hidden_layers=config.n_layer, num_attention_heads=config.n_head, num_key_value_heads=config.n_kv_head,
        head_dim=config.head_dim, max_position_embeddings=config.sequence_len, tie_word_embeddings=False,
        attention_bias=False, mlp_bias=False, rope_parameters={"rope_type": "default", "rope_theta": config.rope_base},
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    hf_config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(hf_config)
    model = model.to(dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# ---------------------------------------------------------------------------------------- timing

def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_ours(engine: Engine, prompt: list[int], batch: int, new_tokens: int, device: str) -> tuple[float, float]:
    """(seconds to the first column, seconds from the first to the last column) of one generate call."""
    sync(device)
    t0 = time.perf_counter()
    first, columns = None, 0
    # generate() already moved every sampled token to Python (.tolist()), so these times are real.
    for column in engine.generate(prompt, num_samples=batch, max_tokens=new_tokens, temperature=0.0):
        if first is None:
            first = time.perf_counter()
        columns += 1
        if any(entry is None for entry in column):
            raise RuntimeError("a row of our engine ended early: the benchmark would not be comparable")
    end = time.perf_counter()
    if columns != new_tokens:
        raise RuntimeError(f"our engine produced {columns} tokens per row, expected {new_tokens}")
    return first - t0, end - first


class StampStreamer:
    """A transformers streamer that only records when each generated token reaches the host.

    generate() calls put() with the prompt first, then with each step's tokens (moved to the CPU,
    i.e. after the device finished the step), and end() once.
    """

    def __init__(self):
        self.puts: list[float] = []

    def put(self, value) -> None:
        self.puts.append(time.perf_counter())

    def end(self) -> None:
        pass


def time_peer(model, prompt: list[int], batch: int, new_tokens: int, device: str) -> tuple[float, float]:
    ids = torch.tensor([prompt] * batch, dtype=torch.long, device=device)
    streamer = StampStreamer()
    sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0,
                             streamer=streamer)
    sync(device)
    end = time.perf_counter()
    produced = out.shape[1] - len(prompt)
    if produced != new_tokens or len(streamer.puts) != new_tokens + 1:
        raise RuntimeError(f"transformers produced {produced} tokens per row, expected {new_tokens}")
    first = streamer.puts[1]  # puts[0] is the prompt
    return first - t0, end - first


def measure(config: GPTConfig, args, device: str, dtype: torch.dtype) -> dict:
    ours = our_model(config, device)
    peer = peer_model(config, device, dtype)
    # Autocast over fp32 master weights is how the engine runs below fp32; at fp32 it runs plain.
    engine = Engine(ours, OutOfVocabSpecials(config.vocab_size), tool=None,
                    dtype=None if dtype == torch.float32 else dtype, compile=args.compile)
    g = torch.Generator().manual_seed(1234)
    prompt = torch.randint(0, config.vocab_size, (args.prompt_len,), generator=g).tolist()
    n_ours = sum(p.numel() for p in ours.parameters())
    n_peer = sum(p.numel() for p in peer.parameters())
    result = {
        "depth": config.n_layer, "config": config.to_dict(), "params_ours": n_ours, "params_transformers": n_peer,
        "llama_intermediate_size": llama_intermediate(config.n_embd), "batches": {},
    }
    print(f"\n== depth {config.n_layer}: width {config.n_embd}, {config.n_head} heads ({config.n_kv_head} kv), "
          f"vocab {config.vocab_size}; params ours {n_ours:,}, Llama {n_peer:,} "
          f"(SwiGLU intermediate {llama_intermediate(config.n_embd)} = round(8d/3))", flush=True)
    for batch in args.batches:
        runs = {"ours": [], "transformers": []}
        for i in range(args.warmup + args.repeats):
            # Alternate the two so slow drifts of a shared machine hit both alike.
            a = time_ours(engine, prompt, batch, args.new_tokens, device)
            b = time_peer(peer, prompt, batch, args.new_tokens, device)
            if i >= args.warmup:
                runs["ours"].append(a)
                runs["transformers"].append(b)
        row = {}
        for name, times in runs.items():
            ttft = statistics.median(t for t, _ in times)
            decode = statistics.median(t for _, t in times)
            row[name] = {"ttft_s": ttft, "decode_tok_per_s": (args.new_tokens - 1) * batch / decode,
                         "runs": [{"ttft_s": t, "decode_s": d} for t, d in times]}
        result["batches"][str(batch)] = row
        print(f"   batch {batch}: ours TTFT {row['ours']['ttft_s'] * 1000:.1f} ms, "
              f"{row['ours']['decode_tok_per_s']:,.0f} tok/s | transformers TTFT "
              f"{row['transformers']['ttft_s'] * 1000:.1f} ms, {row['transformers']['decode_tok_per_s']:,.0f} tok/s",
              flush=True)
    if device.startswith("cuda"):
        result["bound"] = bandwidth_bound(ours, config, args, dtype, result["batches"].get("1"))
    del engine, ours, peer
    return result


# ---------------------------------------------------------------------------------------- CUDA bound

def copy_bandwidth(nbytes: int = 2 << 30, repeats: int = 10) -> float:
    """Best bytes/s (read + written) of a device-to-device copy of nbytes."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = 0.0
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        stop.record()
        stop.synchronize()
        best = max(best, 2 * nbytes / (start.elapsed_time(stop) / 1000))
    del src, dst
    torch.cuda.empty_cache()
    return best


def bytes_per_decode_step(model, config: GPTConfig, args, dtype: torch.dtype) -> tuple[int, int]:
    """(weight bytes, mean KV-cache bytes) one batch-1 decode step must read at the least.

    Every Linear weight (the head included) once, in the compute dtype; the embedding row is
    negligible. Keys and values of every layer up to the current position, averaged over the
    decode steps (positions prompt_len .. prompt_len + new_tokens - 1), sliding windows respected.
    """
    size = torch.finfo(dtype).bits // 8
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)) * size
    positions = range(args.prompt_len, args.prompt_len + args.new_tokens - 1)
    per_key = 2 * config.n_kv_head * config.head_dim * size  # k and v
    kv = sum(per_key * min(p + 1, w) for p in positions for w in config.window_sizes()) / max(len(positions), 1)
    return weights, int(kv)


def bandwidth_bound(model, config: GPTConfig, args, dtype: torch.dtype, batch1: dict | None) -> dict:
    bandwidth = copy_bandwidth()
    weights, kv = bytes_per_decode_step(model, config, args, dtype)
    bound = bandwidth / (weights + kv)
    out = {"copy_bandwidth_gb_s": bandwidth / 1e9, "weight_bytes": weights, "kv_bytes_mean": kv,
           "bound_tok_per_s": bound}
    if batch1:
        out["ours_fraction"] = batch1["ours"]["decode_tok_per_s"] / bound
        out["transformers_fraction"] = batch1["transformers"]["decode_tok_per_s"] / bound
    return out


# ---------------------------------------------------------------------------------------- report

def machine_info(device: str, threads: int) -> dict:
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": threads, "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "device": device,
            "load_average_start": os.getloadavg()}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    return info


def table(results: list[dict]) -> list[str]:
    """Markdown rows: per depth, batch and metric, ours, the peer, and how many times faster we are."""
    lines = ["| depth | batch | metric | ours | transformers | ours faster by |", "|---:|---:|---|---:|---:|---:|"]
    for r in results:
        for batch, row in r["batches"].items():
            o, p = row["ours"], row["transformers"]
            lines.append(f"| {r['depth']} | {batch} | time to first token | {o['ttft_s'] * 1000:,.1f} ms | "
                         f"{p['ttft_s'] * 1000:,.1f} ms | **{p['ttft_s'] / o['ttft_s']:.2f}x** |")
            lines.append(f"| {r['depth']} | {batch} | decode tokens/s | {o['decode_tok_per_s']:,.1f} | "
                         f"{p['decode_tok_per_s']:,.1f} | **{o['decode_tok_per_s'] / p['decode_tok_per_s']:.2f}x** |")
    for r in results:
        b = r.get("bound")
        if b:
            lines.append("")
            lines.append(f"depth {r['depth']}, batch 1 vs the memory-bandwidth bound: copy bandwidth "
                         f"{b['copy_bandwidth_gb_s']:,.0f} GB/s, {b['weight_bytes'] / 1e9:.3f} GB weights + "
                         f"{b['kv_bytes_mean'] / 1e9:.3f} GB KV per step -> bound {b['bound_tok_per_s']:,.0f} tok/s; "
                         f"ours {100 * b.get('ours_fraction', float('nan')):.1f} %, "
                         f"transformers {100 * b.get('transformers_fraction', float('nan')):.1f} % of it")
    return lines


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Inference benchmark, our Engine vs transformers generate() (see module docstring).")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where both models run")
    p.add_argument("--depth", type=int, action="append",
                   help="model depth (GPTConfig.from_depth); repeat for several (default: 4 and 8 on CPU, 20 on CUDA)")
    p.add_argument("--vocab", type=int, default=None, help="vocabulary size (default 32768 on CPU, 65536 on CUDA)")
    p.add_argument("--sequence-len", type=int, default=None, help="training context of the config (default 1024 on CPU, 2048 on CUDA)")
    p.add_argument("--prompt-len", type=int, default=128, help="random prompt tokens")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens generated per row (exactly, both engines)")
    p.add_argument("--batches", default="1,8", help="comma-separated batch sizes (rows generated at once)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="compute dtype (default fp32 on CPU, bf16 on CUDA)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per engine and batch (the median is reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per engine and batch before the timed ones")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    p.add_argument("--compile", action="store_true", help="Engine(compile=True): decode step through torch.compile")
    p.add_argument("--out", default=None, help="results JSON (default bench/results/inference-<device>.json; a .md table goes next to it)")
    args = p.parse_args(argv)
    gpu = args.device == "cuda"
    args.depth = args.depth or ([20] if gpu else [4, 8])
    args.vocab = args.vocab or (65536 if gpu else 32768)
    args.sequence_len = args.sequence_len or (2048 if gpu else 1024)
    args.dtype = args.dtype or ("bf16" if gpu else "fp32")
    args.batches = [int(b) for b in args.batches.split(",") if b]
    args.out = Path(args.out or REPO / "bench" / "results" / f"inference-{args.device}.json")
    if min(args.prompt_len, args.new_tokens, args.repeats, *args.batches) < 1 or args.new_tokens < 2:
        p.error("--prompt-len, --repeats and --batches must be >= 1 and --new-tokens >= 2")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available to torch here "
                         f"(torch {torch.__version__}); run on a GPU machine or use --device cpu")
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    threads = torch.get_num_threads()
    dtype = DTYPES[args.dtype]
    info = machine_info(args.device, threads)
    print(f"machine: {info['cpu']}, {info['cores']} cores, torch threads {threads}"
          + (f", GPU {info['gpu']}" if "gpu" in info else ""))
    print(f"torch {info['torch']}, transformers {info['transformers']}; {args.dtype}, prompt {args.prompt_len} "
          f"tokens, {args.new_tokens} new tokens, greedy, batches {args.batches}, "
          f"median of {args.repeats} after {args.warmup} warm-up", flush=True)
    results = []
    for depth in args.depth:
        config = GPTConfig.from_depth(depth, args.vocab, sequence_len=args.sequence_len)
        results.append(measure(config, args, args.device, dtype))
        if args.device == "cuda":
            torch.cuda.empty_cache()
    info["load_average_end"] = os.getloadavg()
    lines = table(results)
    print()
    print("\n".join(lines))
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    report = {"machine": info, "settings": settings, "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("wrote", args.out)
    return report


if __name__ == "__main__":
    main()
