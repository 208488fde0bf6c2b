"""Run configuration: presets, one validated schema, and stage command lines.

The web form, `manage.py runjob` and the stage commands all go through this
module, so a knob means the same thing everywhere and is checked once:

    from trainer import config
    cfg = config.resolve("tiny", {"vocab_size": 4096})     # raises ConfigError
    for stage in config.stage_commands(cfg, "runs/abc"):   # what the studio runs
        print(stage.name, stage.argv)

Usage as a command (prints the resolved configuration and the stage commands):

    python -m trainer.config tiny --set vocab_size=4096 --run-dir runs/demo
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

# Stages in pipeline order. A stage is runnable once its module exists; the
# studio shows the others as "coming" rather than pretending to run them.
STAGE_ORDER = [
    "tok_train",
    "tok_eval",
    "base_train",
    "base_eval",
    "mid_train",
    "mid_eval",
    "sft_train",
    "sft_eval",
    "rl_train",
    "rl_eval",
]
STAGE_MODULES = {
    "tok_train": "trainer.tok_train",
    "tok_eval": "trainer.tok_eval",
    "base_train": "trainer.base_train",
    "base_eval": "evals.base_eval",
    "mid_train": "trainer.mid_train",
    "mid_eval": "evals.chat_eval",
    "sft_train": "trainer.sft_train",
    "sft_eval": "evals.chat_eval",
    "rl_train": "trainer.rl_train",
    "rl_eval": "evals.chat_eval",
}
# Stages that run one process per GPU under torchrun; the rest are single-process.
DISTRIBUTED_STAGES = {"base_train", "base_eval", "mid_train", "mid_eval", "sft_train", "sft_eval", "rl_train", "rl_eval"}

# Stages that save checkpoints and accept --resume: a paused, failed or
# interrupted run continues them from their latest checkpoint.
RESUMABLE_STAGES = {"base_train", "mid_train", "sft_train", "rl_train"}

DATA_SOURCES = ("fineweb-edu", "climbmix")


class ConfigError(ValueError):
    """Invalid configuration. `errors` maps field name -> message (for forms)."""

    def __init__(self, errors: dict[str, str]):
        self.errors = dict(errors)
        super().__init__("; ".join(f"{k}: {v}" for k, v in self.errors.items()))


@dataclass(frozen=True)
class Field:
    name: str
    kind: type
    default: object
    help: str
    min: float | None = None
    max: float | None = None
    choices: tuple | None = None
    power_of_two: bool = False


FIELDS: list[Field] = [
    Field("depth", int, 20, "Transformer layers; width = 64 x depth (rounded to the 128 head dim).", 1, 64),
    Field("max_seq_len", int, 2048, "Context length in tokens.", 16, 65536, power_of_two=True),
    Field("device_batch_size", int, 32, "Sequences per GPU per micro-step; lower it if you run out of memory.", 1, 1024),
    Field("total_batch_size", int, 524288, "Tokens per optimizer step across all GPUs (gradient accumulation makes up the rest).", 16, 1 << 26),
    Field("nproc_per_node", int, 8, "Processes (GPUs) per node for torchrun stages.", 1, 64),
    Field("nnodes", int, 1, "Nodes for multi-node training (torchrun rendezvous).", 1, 1024),
    Field("rdzv_endpoint", str, "", "HOST:PORT of the first node, for multi-node runs (every node runs the same command)."),
    Field("target_param_data_ratio", float, 20.0, "Training tokens per parameter (Chinchilla ~20).", 0.1, 1000),
    Field("num_iterations", int, -1, "Pretraining optimizer steps; -1 derives them from the tokens-per-parameter ratio.", -1, 10**8),
    Field("eval_every", int, 250, "Validation bits-per-byte every N steps (0: only at the end).", 0, 10**8),
    Field("eval_tokens", int, 20 * 524288, "Validation tokens per evaluation.", 1, 10**11),
    Field("sample_every", int, 2000, "Sample completions of fixed prompts every N steps (0: only at the end).", 0, 10**8),
    Field("save_every", int, 1000, "Checkpoint every N steps (0: only at the end).", 0, 10**8),
    Field("data_source", str, "fineweb-edu", "Pretraining corpus: fineweb-edu or climbmix shards (or the offline mirror).", choices=DATA_SOURCES),
    Field("data_shards", int, 240, "Pretraining shards to download (~250M characters each; the validation shard comes extra).", 1, 7000),
    Field("data_dir", str, "", "Use your own prepared shards from this folder instead of downloading (empty = download / mirror)."),
    Field("vocab_size", int, 65536, "Tokenizer vocabulary incl. 256 bytes and 9 special tokens (2^16 fits uint16).", 512, 1 << 20),
    Field("tok_max_chars", int, 2_000_000_000, "Characters of pretraining text the tokenizer trains on.", 10_000, 10**12),
    Field("tok_doc_cap", int, 10_000, "Each document is cropped to this many characters for tokenizer training.", 100, 10**9),
    Field("stages", list, None, "Pipeline stages to run, in order (default: every stage this version has)."),
]
FIELD_BY_NAME = {f.name: f for f in FIELDS}

PRESETS: dict[str, dict] = {
    # Minutes on a 2-core CPU, trained on the offline mirror's sample shards.
    "tiny": {
        "description": "CPU smoke run: small tokenizer on a few MB, depth-4 model (minutes on a laptop).",
        "depth": 4, "max_seq_len": 256, "device_batch_size": 8, "total_batch_size": 8 * 256,
        "nproc_per_node": 1, "target_param_data_ratio": 0.6, "data_shards": 5,
        "vocab_size": 4096, "tok_max_chars": 20_000_000, "tok_doc_cap": 10_000,
        "eval_every": 250, "eval_tokens": 131072, "sample_every": 1000, "save_every": 500,
    },
    # Seconds, for the studio's end-to-end browser test and a first look at the pages.
    "smoke": {
        "description": "Seconds-long CPU check of the whole pipeline: 1k-vocab tokenizer, depth-2 model, 60 steps.",
        "depth": 2, "max_seq_len": 128, "device_batch_size": 4, "total_batch_size": 4 * 128,
        "nproc_per_node": 1, "num_iterations": 60, "data_shards": 1,
        "vocab_size": 1024, "tok_max_chars": 1_000_000, "tok_doc_cap": 5_000,
        "eval_every": 20, "eval_tokens": 8192, "sample_every": 30, "save_every": 30,
    },
    # The reference "$100" run: depth 20 on 8xH100, ~4 hours.
    "speedrun": {
        "description": "Depth 20 (~561M params) on 8xH100, ~4 h, ~$100.",
        "depth": 20, "device_batch_size": 32, "nproc_per_node": 8, "data_shards": 240,
        "vocab_size": 65536, "tok_max_chars": 2_000_000_000,
    },
    "d26": {
        "description": "Depth 26 (~1.1B params), ~12 h on 8xH100, beats GPT-2 on CORE.",
        "depth": 26, "device_batch_size": 16, "nproc_per_node": 8, "data_shards": 450,
        "vocab_size": 65536, "tok_max_chars": 2_000_000_000,
    },
    "d32": {
        "description": "Depth 32 (~1.9B params), ~33-41 h on 8xH100, ~$1000.",
        "depth": 32, "device_batch_size": 8, "nproc_per_node": 8, "data_shards": 800,
        "vocab_size": 65536, "tok_max_chars": 4_000_000_000,
    },
}


def available_stages() -> list[str]:
    return [s for s in STAGE_ORDER if stage_available(s)]


def defaults() -> dict:
    out = {f.name: (list(f.default) if isinstance(f.default, list) else f.default) for f in FIELDS}
    out["stages"] = available_stages()
    return out


def stage_available(stage: str) -> bool:
    """True when the stage's module exists in this checkout."""
    module = STAGE_MODULES.get(stage)
    return module is not None and importlib.util.find_spec(module) is not None


def _coerce(f: Field, value):
    """Turn form/CLI text into the field's type, or raise ValueError with a fix."""
    if f.kind is list:
        if isinstance(value, str):
            value = [s.strip() for s in value.split(",") if s.strip()]
        if not isinstance(value, (list, tuple)):
            raise ValueError("expected a list of stage names")
        return list(value)
    if f.kind is int:
        if isinstance(value, bool):
            raise ValueError("expected a whole number")
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            text = value.strip().replace("_", "")
            try:
                return int(text)
            except ValueError:
                try:
                    as_float = float(text)  # accept 2e9
                except ValueError:
                    raise ValueError(f"expected a whole number, got {value!r}") from None
                if not as_float.is_integer():
                    raise ValueError(f"expected a whole number, got {value!r}") from None
                return int(as_float)
        if isinstance(value, int):
            return value
        raise ValueError(f"expected a whole number, got {value!r}")
    if f.kind is float:
        if isinstance(value, bool):
            raise ValueError("expected a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"expected a number, got {value!r}") from None
    if f.kind is str:
        if not isinstance(value, str):
            raise ValueError(f"expected text, got {value!r}")
        return value.strip()
    raise AssertionError(f.kind)


def validate(cfg: dict) -> dict:
    """Check every field and the cross-field rules; return a clean copy."""
    errors: dict[str, str] = {}
    clean = {}
    for name in cfg:
        if name not in FIELD_BY_NAME and name not in ("preset", "description"):
            close = [f.name for f in FIELDS if name.replace("-", "_") == f.name]
            hint = f" (did you mean {close[0]}?)" if close else ""
            errors[name] = f"unknown setting{hint}; known: {', '.join(FIELD_BY_NAME)}"
    for f in FIELDS:
        value = cfg.get(f.name, f.default)
        if value is None and f.name == "stages":
            value = available_stages()
        try:
            value = _coerce(f, value)
        except ValueError as e:
            errors[f.name] = str(e)
            continue
        if f.min is not None and value < f.min:
            errors[f.name] = f"must be at least {f.min:g}, got {value}"
        elif f.max is not None and value > f.max:
            errors[f.name] = f"must be at most {f.max:g}, got {value}"
        elif f.choices and value not in f.choices:
            errors[f.name] = f"must be one of {', '.join(f.choices)}, got {value!r}"
        elif f.power_of_two and value & (value - 1):
            errors[f.name] = f"must be a power of two (e.g. {1 << (value.bit_length() - 1)}), got {value}"
        clean[f.name] = value
    clean["preset"] = cfg.get("preset", "")
    clean["description"] = cfg.get("description", "")

    if "stages" in clean:
        unknown = [s for s in clean["stages"] if s not in STAGE_ORDER]
        if unknown:
            errors["stages"] = f"unknown stage(s) {', '.join(unknown)}; choose from {', '.join(STAGE_ORDER)}"
        elif not clean["stages"]:
            errors["stages"] = "choose at least one stage"
        elif len(set(clean["stages"])) != len(clean["stages"]):
            errors["stages"] = "a stage is listed twice"
        else:
            missing = [s for s in clean["stages"] if not stage_available(s)]
            if missing:
                errors["stages"] = (
                    f"stage(s) {', '.join(missing)} are not part of this version yet; "
                    f"available: {', '.join(available_stages())}"
                )
            else:
                clean["stages"] = [s for s in STAGE_ORDER if s in clean["stages"]]
    vocab = clean.get("vocab_size")
    if isinstance(vocab, int) and "vocab_size" not in errors and vocab < 256 + 9 + 1:
        errors["vocab_size"] = "must leave room for 256 byte tokens, 9 special tokens and at least one merge"
    seq, dbs, tbs, nproc, nnodes = (clean.get(k) for k in ("max_seq_len", "device_batch_size", "total_batch_size", "nproc_per_node", "nnodes"))
    if all(isinstance(v, int) for v in (seq, dbs, tbs, nproc, nnodes)) and not errors.keys() & {"max_seq_len", "device_batch_size", "total_batch_size", "nproc_per_node", "nnodes"}:
        per_step = seq * dbs * nproc * nnodes
        if tbs % per_step:
            fits = max(per_step, (tbs // per_step) * per_step)
            errors["total_batch_size"] = (
                f"{tbs} tokens is not a multiple of max_seq_len x device_batch_size x GPUs = {per_step}; "
                f"use e.g. {fits}"
            )
    if clean.get("nnodes", 1) > 1 and not re.fullmatch(r"[\w.\-\[\]:]+:\d+", clean.get("rdzv_endpoint", "")):
        errors["rdzv_endpoint"] = "multi-node runs need HOST:PORT of the first node (reachable from every node), e.g. 10.0.0.1:29500"
    if clean.get("num_iterations") == 0:
        errors["num_iterations"] = "0 steps would train nothing; give a number of steps, or -1 to derive them from target_param_data_ratio"
    data_dir = clean.get("data_dir", "")
    if data_dir and "data_dir" not in errors:
        # The one path a person types in: it must name an existing folder of
        # prepared shards (python -m trainer.data prepare), given absolutely so
        # it means the same on every node and from every working directory.
        if "\x00" in data_dir or not Path(data_dir).is_absolute():
            errors["data_dir"] = f"give an absolute folder path, e.g. /data/my-corpus (got {data_dir!r})"
        elif not Path(data_dir).is_dir():
            errors["data_dir"] = f"no such folder {data_dir}; prepare one with `python -m trainer.data prepare --out {data_dir} ...`"
    if errors:
        raise ConfigError(errors)
    return clean


def resolve(preset: str, overrides: dict | None = None) -> dict:
    """Preset values, then overrides, validated. Unknown preset -> ConfigError."""
    if preset not in PRESETS:
        raise ConfigError({"preset": f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}"})
    cfg = defaults()
    cfg.update(PRESETS[preset])
    cfg.update(overrides or {})
    cfg["preset"] = preset
    return validate(cfg)


@dataclass
class StageCommand:
    name: str
    argv: list[str]
    distributed: bool = False
    env: dict = field(default_factory=dict)


def stage_commands(cfg: dict, run_dir: str, python: str | None = None) -> list[StageCommand]:
    """The command line of every selected stage, as a person would type it."""
    python = python or sys.executable
    out = []
    for stage in cfg["stages"]:
        args = ["--run-dir", str(run_dir)]
        if stage == "tok_train":
            args += [
                f"--vocab-size={cfg['vocab_size']}",
                f"--max-chars={cfg['tok_max_chars']}",
                f"--doc-cap={cfg['tok_doc_cap']}",
                f"--data-source={cfg['data_source']}",
            ]
            if cfg["data_dir"]:
                args.append(f"--data-dir={cfg['data_dir']}")
        elif stage == "base_train":
            args += [
                f"--depth={cfg['depth']}",
                f"--max-seq-len={cfg['max_seq_len']}",
                f"--device-batch-size={cfg['device_batch_size']}",
                f"--total-batch-size={cfg['total_batch_size']}",
                f"--target-param-data-ratio={cfg['target_param_data_ratio']}",
                f"--num-iterations={cfg['num_iterations']}",
                f"--eval-every={cfg['eval_every']}",
                f"--eval-tokens={cfg['eval_tokens']}",
                f"--sample-every={cfg['sample_every']}",
                f"--save-every={cfg['save_every']}",
                f"--data-source={cfg['data_source']}",
                f"--num-shards={cfg['data_shards']}",
            ]
            if cfg["data_dir"]:
                args.append(f"--data-dir={cfg['data_dir']}")
        elif stage == "tok_eval":
            args.append(f"--data-source={cfg['data_source']}")
            if cfg["data_dir"]:
                args.append(f"--data-dir={cfg['data_dir']}")
        module = STAGE_MODULES[stage]
        # One process on one device needs no launcher; more go through torchrun.
        launch = stage in DISTRIBUTED_STAGES and (cfg["nproc_per_node"] > 1 or cfg["nnodes"] > 1)
        if launch and cfg["nnodes"] > 1:
            # Multi-node: the same command runs on every node; the studio fills in the rendezvous.
            argv = [python, "-m", "torch.distributed.run", f"--nnodes={cfg['nnodes']}",
                    f"--nproc_per_node={cfg['nproc_per_node']}", "--rdzv-backend=c10d",
                    f"--rdzv-endpoint={cfg['rdzv_endpoint']}", f"--rdzv-id={Path(str(run_dir)).name}", "-m", module, *args]
        elif launch:
            argv = [python, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc_per_node={cfg['nproc_per_node']}", "-m", module, *args]
        else:
            argv = [python, "-m", module, *args]
        out.append(StageCommand(stage, argv, launch))
    return out


def parse_overrides(pairs: list[str]) -> dict:
    """`key=value` strings from the command line -> dict (values stay text; validate() coerces)."""
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError({pair: "expected key=value, e.g. depth=12"})
        key, value = pair.split("=", 1)
        out[key.strip().replace("-", "_")] = value
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description="Resolve a preset plus overrides and print the stage commands.")
    parser.add_argument("preset", choices=sorted(PRESETS), help="starting preset")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting (repeatable)")
    parser.add_argument("--run-dir", default="runs/example", help="run directory the commands would write")
    args = parser.parse_args(argv)
    try:
        cfg = resolve(args.preset, parse_overrides(args.set))
    except ConfigError as e:
        parser.error(str(e))
    print(json.dumps(cfg, indent=2))
    for stage in stage_commands(cfg, args.run_dir):
        print(stage.name, ":", " ".join(stage.argv))


if __name__ == "__main__":
    main()
