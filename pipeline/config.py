"""Run configuration: presets, one validated schema, and stage command lines.

The web form, `manage.py runjob` and the stage commands all go through this
module, so a knob means the same thing everywhere and is checked once:

    from pipeline import config
    cfg = config.resolve("tiny", {"vocab_size": 4096})     # raises ConfigError
    for stage in config.stage_commands(cfg, "runs/abc"):   # what the studio runs
        print(stage.name, stage.argv)

Usage as a command (prints the resolved configuration and the stage commands):

    python -m pipeline.config tiny --set vocab_size=4096 --run-dir runs/demo
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import math
import re
import reprlib
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import plan
from pipeline import stages as stage_table

DATA_SOURCES = ("fineweb-edu", "climbmix")

# Linux limits (PATH_MAX, NAME_MAX): longer paths fail in stat() with ENAMETOOLONG.
PATH_MAX = 4096
NAME_MAX = 255
# The two free-text keys besides the schema's fields.
PRESET_MAX_LENGTH = 100
DESCRIPTION_MAX_LENGTH = 500
# RFC 1123 labels, plus "_" which container and cluster host names often have (getaddrinfo takes it).
HOSTNAME_LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")


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
    max_length: int | None = None  # characters; every text field has one (checked below)


FIELDS: list[Field] = [
    Field("depth", int, 20, "Transformer layers; width = 64 x depth (rounded to the 128 head dim).", 1, 64),
    Field("max_seq_len", int, 2048, "Context length in tokens.", 16, 65536, power_of_two=True),
    Field("device_batch_size", int, 32, "Sequences per GPU per micro-step; lower it if you run out of memory.", 1, 1024),
    Field("total_batch_size", int, 524288, "Tokens per optimizer step across all GPUs (gradient accumulation makes up the rest).", 16, 1 << 26),
    Field("nproc_per_node", int, 8, "Processes (GPUs) per node for torchrun stages.", 1, 64),
    Field("nnodes", int, 1, "Nodes for multi-node training (torchrun rendezvous).", 1, 1024),
    Field("rdzv_endpoint", str, "", "HOST:PORT of the first node, for multi-node runs (every node runs the same command).",
          max_length=300),
    Field("target_param_data_ratio", float, 20.0, "Training tokens per parameter (Chinchilla ~20).", 0.1, 1000),
    Field("num_iterations", int, -1, "Pretraining optimizer steps; -1 derives them from the tokens-per-parameter ratio.", -1, 10**8),
    Field("eval_every", int, 250, "Validation bits-per-byte every N steps (0: only at the end).", 0, 10**8),
    Field("eval_tokens", int, 20 * 524288, "Validation tokens per evaluation.", 1, 10**11),
    Field("core_max_per_task", int, -1, "CORE examples per task in the base model evaluation (-1: all of them).", -1, 10**7),
    Field("sample_every", int, 2000, "Sample completions of fixed prompts every N steps (0: only at the end).", 0, 10**8),
    Field("save_every", int, 1000, "Checkpoint every N steps (0: only at the end).", 0, 10**8),
    Field("data_source", str, "fineweb-edu", "Pretraining corpus: fineweb-edu or climbmix shards (or the offline mirror).",
          choices=DATA_SOURCES, max_length=64),
    Field("data_shards", int, 240, "Pretraining shards to download (~250M characters each; the validation shard comes extra).", 1, 7000),
    Field("data_dir", str, "", "Use your own prepared shards from this folder instead of downloading (empty = download / mirror).",
          max_length=PATH_MAX),
    Field("vocab_size", int, 65536, "Tokenizer vocabulary incl. 256 bytes and 9 special tokens (2^16 fits uint16).", 512, 1 << 20),
    Field("tok_max_chars", int, 2_000_000_000, "Characters of pretraining text the tokenizer trains on.", 10_000, 10**12),
    Field("tok_doc_cap", int, 10_000, "Each document is cropped to this many characters for tokenizer training.", 100, 10**9),
    Field("stages", list, None, "Pipeline stages to run, in order (default: every stage this version has)."),
]
FIELD_BY_NAME = {f.name: f for f in FIELDS}
# Text that reaches the database, config.json and command lines is bounded: a
# megabyte pasted into a box is refused, not stored and passed to torchrun.
assert all(f.max_length for f in FIELDS if f.kind is str), "every text field needs a max_length"

PRESETS: dict[str, dict] = {
    # Minutes on a 2-core CPU, trained on the offline mirror's sample shards.
    "tiny": {
        "description": "CPU smoke run: small tokenizer on a few MB, depth-4 model (minutes on a laptop).",
        "depth": 4, "max_seq_len": 256, "device_batch_size": 8, "total_batch_size": 8 * 256,
        "nproc_per_node": 1, "target_param_data_ratio": 0.6, "data_shards": 5,
        "vocab_size": 4096, "tok_max_chars": 20_000_000, "tok_doc_cap": 10_000,
        "eval_every": 250, "eval_tokens": 131072, "sample_every": 1000, "save_every": 500, "core_max_per_task": 50,
    },
    # Seconds, for the studio's end-to-end browser test and a first look at the pages.
    "smoke": {
        "description": "Seconds-long CPU check of the whole pipeline: 1k-vocab tokenizer, depth-2 model, 60 steps.",
        "depth": 2, "max_seq_len": 128, "device_batch_size": 4, "total_batch_size": 4 * 128,
        "nproc_per_node": 1, "num_iterations": 60, "data_shards": 1,
        "vocab_size": 1024, "tok_max_chars": 1_000_000, "tok_doc_cap": 5_000,
        "eval_every": 20, "eval_tokens": 8192, "sample_every": 30, "save_every": 30, "core_max_per_task": 4,
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
    return stage_table.available()


def defaults() -> dict:
    out = {f.name: (list(f.default) if isinstance(f.default, list) else f.default) for f in FIELDS}
    out["stages"] = available_stages()
    return out


class _Brief(reprlib.Repr):
    """reprlib with room for a path, and big numbers shown by size (str() of a 5000-digit int raises)."""

    def __init__(self):
        super().__init__()
        self.maxstring = self.maxother = 80
        self.maxlong = 40

    def repr_int(self, x, level):
        if x.bit_length() > 128:
            return f"a {'negative ' if x < 0 else ''}number of about {int(x.bit_length() * math.log10(2)) + 1} digits"
        return super().repr_int(x, level)


_brief = _Brief()


def _show(value) -> str:
    """A value as an error message quotes it: short, whatever was typed (a megabyte, a NaN, a dict)."""
    return _brief.repr(value)


def _clip(text: str, n: int = 40) -> str:
    return text if len(text) <= n else text[:n] + "…"


def _text_problem(value: str, max_length: int) -> str | None:
    """Why `value` cannot be stored as text (in PostgreSQL, SQLite, JSON and argv), or None."""
    if len(value) > max_length:
        return f"must be at most {max_length} characters, got {len(value)}"
    if "\x00" in value:
        return "must not contain NUL characters (\\x00)"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        # Lone surrogates: argv bytes that are not UTF-8 (a file name in another encoding).
        return "must be valid UTF-8 text; it holds undecodable bytes (rename the folder or retype the value)"
    return None


def _endpoint_problem(text: str) -> str | None:
    """None when `text` is HOST:PORT with a hostname, an IPv4 address or a [bracketed] IPv6 address."""
    how = "must be HOST:PORT of the first node (a hostname, IPv4 or [IPv6] address, port 1-65535), e.g. 10.0.0.1:29500"
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        return f"{how}; got {_show(text)}"
    if not (port.isascii() and port.isdigit() and len(port) <= 5 and 1 <= int(port) <= 65535):
        return f"{how}; the port {_show(port)} is not a number from 1 to 65535"
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return f"{how}; {_show(host)} is not an IPv6 address"
        return None
    if re.fullmatch(r"[0-9.]+", host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return f"{how}; {_show(host)} is not an IPv4 address"
        return None
    labels = host.split(".")
    if len(host) > 253 or not all(HOSTNAME_LABEL.fullmatch(label) for label in labels):
        return f"{how}; {_show(host)} is not a hostname (letters, digits and hyphens; IPv6 goes in brackets)"
    return None


def _path_problem(path: str) -> str | None:
    """Length rules of Linux paths, checked before the filesystem is asked (stat() raises past them)."""
    raw = path.encode("utf-8")
    if len(raw) > PATH_MAX:
        return f"must be at most {PATH_MAX} bytes long (PATH_MAX), got {len(raw)}"
    for part in raw.split(b"/"):
        if len(part) > NAME_MAX:
            name = _clip(part.decode("utf-8", "replace"))
            return f"each folder name must be at most {NAME_MAX} bytes (NAME_MAX); {name!r} has {len(part)}"
    return None


def _coerce(f: Field, value):
    """Turn form/CLI text into the field's type, or raise ValueError with a fix."""
    if f.kind is list:
        if isinstance(value, str):
            value = [s.strip() for s in value.split(",") if s.strip()]
        if not isinstance(value, (list, tuple)) or not all(isinstance(s, str) for s in value):
            raise ValueError(f"expected a list of stage names, e.g. tok_train,base_train; got {_show(value)}")
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
                if text.lstrip("+-").isdigit():  # past int()'s 4300-digit limit for text
                    limit = f"must be at most {f.max:g}" if f.max is not None else "too large"
                    raise ValueError(f"{limit}, got a {len(text)}-digit number") from None
                try:
                    as_float = float(text)  # accept 2e9
                except ValueError:
                    raise ValueError(f"expected a whole number, got {_show(value)}") from None
                if not as_float.is_integer():
                    raise ValueError(f"expected a whole number, got {_show(value)}") from None
                return int(as_float)
        if isinstance(value, int):
            return value
        raise ValueError(f"expected a whole number, got {_show(value)}")
    if f.kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError(f"expected a number, got {_show(value)}")
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"expected a number, got {_show(value)}") from None
        except OverflowError:  # an int past 1.8e308
            raise ValueError(f"expected a finite number, got {_show(value)}") from None
        # NaN slips through every range check (all comparisons are false) and
        # then fails in the database's JSON column: refuse it here, for every caller.
        if not math.isfinite(number):
            raise ValueError(f"expected a finite number, got {_show(value)}")
        return number
    if f.kind is str:
        if not isinstance(value, str):
            raise ValueError(f"expected text, got {_show(value)}")
        value = value.strip()
        problem = _text_problem(value, f.max_length)
        if problem:
            raise ValueError(problem)
        return value
    raise AssertionError(f.kind)


def validate(cfg: dict) -> dict:
    """Check every field and the cross-field rules; return a clean copy."""
    errors: dict[str, str] = {}
    clean = {}
    for name in cfg:
        if name not in FIELD_BY_NAME and name not in ("preset", "description"):
            key = _clip(name, 60) if isinstance(name, str) else _show(name)
            close = [f.name for f in FIELDS if isinstance(name, str) and name.replace("-", "_") == f.name]
            hint = f" (did you mean {close[0]}?)" if close else ""
            errors[key] = f"unknown setting{hint}; known: {', '.join(FIELD_BY_NAME)}"
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
            errors[f.name] = plan.at_least(f.min, _show(value))
        elif f.max is not None and value > f.max:
            errors[f.name] = f"must be at most {f.max:g}, got {_show(value)}"
        elif f.choices and value not in f.choices:
            errors[f.name] = f"must be one of {', '.join(f.choices)}, got {_show(value)}"
        elif f.power_of_two and value & (value - 1):
            errors[f.name] = f"must be a power of two (e.g. {1 << (value.bit_length() - 1)}), got {value}"
        clean[f.name] = value
    for name, limit in (("preset", PRESET_MAX_LENGTH), ("description", DESCRIPTION_MAX_LENGTH)):
        value = cfg.get(name, "")
        problem = f"expected text, got {_show(value)}" if not isinstance(value, str) else _text_problem(value, limit)
        if problem:
            errors[name] = problem
        else:
            clean[name] = value

    if "stages" in clean:
        unknown = [s for s in clean["stages"] if s not in stage_table.BY_NAME]
        if unknown:
            listed = ", ".join(_clip(s) for s in unknown[:5]) + (", …" if len(unknown) > 5 else "")
            errors["stages"] = f"unknown stage(s) {listed}; choose from {', '.join(stage_table.ORDER)}"
        elif not clean["stages"]:
            errors["stages"] = "choose at least one stage"
        elif len(set(clean["stages"])) != len(clean["stages"]):
            errors["stages"] = "a stage is listed twice"
        else:
            missing = [s for s in clean["stages"] if not stage_table.get(s).available]
            if missing:
                errors["stages"] = (
                    f"stage(s) {', '.join(missing)} are not part of this version yet; "
                    f"available: {', '.join(available_stages())}"
                )
            else:
                clean["stages"] = [s for s in stage_table.ORDER if s in clean["stages"]]
    vocab = clean.get("vocab_size")
    if isinstance(vocab, int) and "vocab_size" not in errors and vocab < 256 + 9 + 1:
        errors["vocab_size"] = "must leave room for 256 byte tokens, 9 special tokens and at least one merge"
    seq, dbs, tbs, nproc, nnodes = (clean.get(k) for k in ("max_seq_len", "device_batch_size", "total_batch_size", "nproc_per_node", "nnodes"))
    if all(isinstance(v, int) for v in (seq, dbs, tbs, nproc, nnodes)) and not errors.keys() & {"max_seq_len", "device_batch_size", "total_batch_size", "nproc_per_node", "nnodes"}:
        problem = plan.batch_mismatch(tbs, dbs, seq, nproc * nnodes)
        if problem:
            errors["total_batch_size"] = problem
    endpoint = clean.get("rdzv_endpoint", "")
    if endpoint and "rdzv_endpoint" not in errors:
        # Checked whenever given (not only for multi-node runs): nothing unusable is stored.
        problem = _endpoint_problem(endpoint)
        if problem:
            errors["rdzv_endpoint"] = problem
    elif not endpoint and "rdzv_endpoint" not in errors and clean.get("nnodes", 1) > 1:
        errors["rdzv_endpoint"] = "multi-node runs need HOST:PORT of the first node (reachable from every node), e.g. 10.0.0.1:29500"
    if not errors.keys() & {"num_iterations", "target_param_data_ratio"}:
        problem = plan.horizon_problem(clean["num_iterations"], -1.0, clean["target_param_data_ratio"])
        if problem:
            errors["num_iterations"] = problem
    data_dir = clean.get("data_dir", "")
    if data_dir and "data_dir" not in errors:
        # The one path a person types in: it must name an existing folder of
        # prepared shards (python -m gpt.data prepare), given absolutely so
        # it means the same on every node and from every working directory.
        problem = _path_problem(data_dir)
        if problem:
            errors["data_dir"] = problem
        elif not Path(data_dir).is_absolute():
            errors["data_dir"] = f"give an absolute folder path, e.g. /data/my-corpus (got {_show(data_dir)})"
        else:
            shown = _clip(data_dir, 300)
            missing = f"no such folder {shown}; prepare one with `python -m gpt.data prepare --out {shown} ...`"
            try:
                mode = Path(data_dir).stat().st_mode
            except (FileNotFoundError, NotADirectoryError):
                errors["data_dir"] = missing
            except OSError as e:  # EACCES, ELOOP, EIO: say so instead of a traceback
                errors["data_dir"] = f"cannot read {shown}: {e.strerror or e}; check the path and its permissions"
            else:
                if not stat.S_ISDIR(mode):
                    errors["data_dir"] = missing
    if errors:
        raise ConfigError(errors)
    return clean


def resolve(preset: str, overrides: dict | None = None) -> dict:
    """Preset values, then overrides, validated. Unknown preset -> ConfigError."""
    if not isinstance(preset, str) or preset not in PRESETS:
        raise ConfigError({"preset": f"unknown preset {_show(preset)}; choose from {', '.join(PRESETS)}"})
    if overrides is not None and not isinstance(overrides, dict):
        raise ConfigError({"overrides": f"expected a mapping of setting -> value, got {_show(overrides)}"})
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
    for name in cfg["stages"]:
        stage = stage_table.get(name)
        args = ["--run-dir", str(run_dir), *stage.stage_args(cfg)]
        module = stage.module
        # One process on one device needs no launcher; more go through torchrun.
        launch = stage.distributed and (cfg["nproc_per_node"] > 1 or cfg["nnodes"] > 1)
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
        out.append(StageCommand(name, argv, launch))
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
