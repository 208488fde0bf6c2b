"""Pretraining batches: parquet shards -> tokens -> BOS-aligned, best-fit packed rows.

    loader = PretrainLoader(shards.train, tok, batch_size=32, seq_len=2048, rank=r, world_size=W, device="cuda")
    for inputs, targets, state in loader:      # (B, T) int64 each, on the device
        ...                                    # state: JSON-able position *after* this batch
    PretrainLoader(..., state=saved_state)     # resumes exactly: the next batch is bit-identical

    for x, y in val_batches([shards.val], tok, 32, 2048, max_tokens=10_485_760, rank=r, world_size=W): ...

How rows are made (BOS-aligned best-fit packing, as the reference project packs its rows):
  * rank r of W reads row groups r, r+W, r+2W, ... of the files taken in order
    (numbered across files, so many small files still spread over ranks);
  * background threads read row groups and tokenize them in chunks of
    `tokenizer_batch` documents, each document prefixed with BOS;
  * the packer keeps ~`buffer_docs` tokenized documents and fills each row of
    seq_len + 1 tokens by repeatedly taking the LARGEST document that still
    fits; when none fits it takes the SHORTEST one and crops it to fill the
    row exactly. The cropped remainder is thrown away: at seq_len 2048 on
    FineWeb-Edu the reference measured ~35% of tokens lost this way, and at
    the tiny CPU context lengths almost every document is longer than a row,
    so most of each document is discarded (`loader.stats` counts it). The
    gain is that every row starts with BOS and has no padding, and a
    document that fits in the space left is never split.

Exact resume: packing happens in the consumer's thread, so the yielded state
is the position of the next chunk the packer will take, plus the documents
waiting in its buffer (token ids, base64, cut to the seq_len + 1 tokens that
can ever be used). Prefetched-but-unused chunks are simply read again. Thread
timing never changes the batches.

Your own corpus in the same layout:
    python -m gpt.data prepare --input my_texts/ more.jsonl.gz --out data/mine
    python -m trainer.base_train --data-dir data/mine ...
Check throughput and crop waste of a tokenizer on some shards:
    python -m gpt.data stats --run-dir runs/<id> --batch-size 8 --seq-len 512
"""

from __future__ import annotations

import argparse
import base64
import bisect
import gzip
import json
import math
import os
import queue
import random
import re
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from pipeline.dataset import DatasetError

STATE_VERSION = 1
_END = object()  # the prefetcher has no more chunks (loop=False)


# ---------------------------------------------------------------------------
# Best-fit buffer


class DocBuffer:
    """Tokenized documents waiting to be packed, sorted by (length, arrival).

    Sorted keys make "largest document that fits" a binary search instead of
    the reference's linear scan. Ties: best fit takes the newest of the
    longest fitting documents, the crop case the oldest of the shortest.
    A document is (full length incl. BOS, base64 of its first seq_len + 1 ids):
    base64 because the buffer goes into every yielded state as it is.
    """

    def __init__(self):
        self.keys: list[tuple[int, int, str]] = []
        self.arrivals = 0

    def __len__(self):
        return len(self.keys)

    def add(self, length: int, blob: str):
        bisect.insort(self.keys, (length, self.arrivals, blob))
        self.arrivals += 1

    def take(self, room: int) -> tuple[int, str]:
        """Remove and return the largest document of length <= room, else the shortest one."""
        i = bisect.bisect_right(self.keys, (room, math.inf)) - 1
        length, _, blob = self.keys.pop(max(i, 0))
        return length, blob


def pack_row(row: np.ndarray, buffer: DocBuffer, refill, dtype, stats: dict) -> bool:
    """Fill `row` completely from the buffer; False if the documents ran out first.

    `refill()` is called before every pick and tops the buffer up (it may add
    nothing when the data is exhausted).
    """
    pos, size = 0, len(row)
    while pos < size:
        refill()
        if not len(buffer):
            return False
        length, blob = buffer.take(size - pos)
        n = min(length, size - pos)
        row[pos:pos + n] = np.frombuffer(base64.b64decode(blob), dtype=dtype)[:n]
        pos += n
        stats["docs"] += 1
        stats["doc_tokens"] += length
        stats["cropped_tokens"] += length - n
    stats["rows"] += 1
    return True


# ---------------------------------------------------------------------------
# The loader


def _row_groups(paths) -> tuple[list[tuple[Path, int]], list[str]]:
    """Every (file, row group) in order; fails early, naming the file, on a missing or damaged one."""
    import pyarrow.parquet as pq

    units, names = [], []
    for path in map(Path, paths):
        if not path.exists():
            raise DatasetError(f"{path} does not exist; check --data-dir (or the mirror/cache folder) and the shard count")
        try:
            meta = pq.read_metadata(path)
        except Exception as e:  # pyarrow raises several types for a damaged file
            raise DatasetError(f"{path} is not a readable parquet file ({e}); delete it so that it is downloaded again, "
                               "or re-create it if it came from --data-dir") from e
        if "text" not in meta.schema.names:
            raise DatasetError(f"{path} has no 'text' column (columns: {meta.schema.names})")
        units += [(path, rg) for rg in range(meta.num_row_groups)]
        names.append(path.name)
    return units, names


class PretrainLoader:
    """Packed (inputs, targets, state) batches for one rank; see the module docstring.

    paths: parquet files with a `text` column, read in this order.
    rank, world_size: this reader's stride of the row groups (base_train passes micro-batch streams here).
    state: a state this loader yielded before; the batches continue exactly from there. It must come
        from the same files, seq_len, tokenizer, rank and world_size (else ValueError). A different
        buffer_docs or tokenizer_batch resumes validly, but not bit-identically.
    threads: chunks tokenized at once on worker threads (tokenizers also spreads each chunk over cores).
    buffer_docs: documents the best-fit packer chooses from.
    loop: start again at the first row group when the data ends (and count epochs); else stop there.
    tokenizer_batch: documents per tokenizer call, and the step of the saved position within a row group.
    split: "row_groups" (the rank's stride of row groups) or "documents" (every rank reads every row
        group and keeps its stride of documents: for a validation shard with fewer row groups than ranks).
    """

    def __init__(self, paths, tokenizer, batch_size: int, seq_len: int, *, rank: int = 0, world_size: int = 1,
                 device="cpu", state: dict | None = None, threads: int = 2, buffer_docs: int = 1000,
                 loop: bool = True, tokenizer_batch: int = 128, split: str = "row_groups"):
        for name, value in (("batch_size", batch_size), ("seq_len", seq_len), ("threads", threads),
                            ("buffer_docs", buffer_docs), ("tokenizer_batch", tokenizer_batch), ("world_size", world_size)):
            if int(value) < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if split not in ("row_groups", "documents"):
            raise ValueError(f"split must be 'row_groups' or 'documents', got {split!r}")
        self.paths = [Path(p) for p in paths]
        if not self.paths:
            raise ValueError("no parquet files given")
        self.tokenizer = tokenizer
        self.batch_size, self.seq_len = int(batch_size), int(seq_len)
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.threads, self.buffer_docs, self.tokenizer_batch = threads, buffer_docs, tokenizer_batch
        self.loop, self.split = loop, split
        self.bos = tokenizer.bos_id
        # uint16 halves the saved buffer for vocabularies up to 65,536 (the default size)
        self.dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32

        every, self.file_names = _row_groups(self.paths)
        self.units = every[rank::world_size] if split == "row_groups" else every
        if not self.units:
            raise ValueError(
                f"rank {rank} of {world_size} has no row groups to read: the {len(self.paths)} file(s) hold {len(every)} "
                f"row group(s) in all (1,024 documents each upstream); use at most {len(every)} ranks x micro-batch "
                "streams, or more shards")
        self._state = self._check_state(state) if state is not None else self._initial_state()

    # -- state ------------------------------------------------------------

    def _initial_state(self) -> dict:
        return {"version": STATE_VERSION, "rank": self.rank, "world_size": self.world_size, "split": self.split,
                "seq_len": self.seq_len, "vocab_size": self.tokenizer.vocab_size, "files": self.file_names,
                "epoch": 0, "unit": 0, "offset": 0, "dtype": np.dtype(self.dtype).name,
                "pending": [], "pending_lengths": [],
                "stats": {"docs": 0, "doc_tokens": 0, "cropped_tokens": 0, "rows": 0}}

    def _check_state(self, state: dict) -> dict:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r} is not {STATE_VERSION}; it was saved by another version")
        mine = self._initial_state()
        # These change what a position or a buffered document means: resuming would be silently wrong.
        for key in ("rank", "world_size", "split", "seq_len", "vocab_size", "dtype", "files"):
            saved, here = state.get(key), mine[key]
            if saved != here:
                if key == "files":
                    saved, here = f"{len(saved or [])} files {saved}"[:200], f"{len(here)} files {here}"[:200]
                raise ValueError(f"loader state was saved with {key}={saved}, this loader has {key}={here}; "
                                 "resume with the same shards, seq len, tokenizer, ranks and batch settings")
        if not 0 <= state["unit"] <= len(self.units) or len(state["pending"]) != len(state["pending_lengths"]):
            raise ValueError("loader state is inconsistent (position out of range or a damaged buffer)")
        return {**mine, **{k: state[k] for k in ("epoch", "unit", "offset", "pending", "pending_lengths", "stats")}}

    def state_dict(self) -> dict:
        """The position after the last yielded batch (or the initial/given one): json-able, resumes exactly."""
        return self._state

    @property
    def stats(self) -> dict:
        """Documents placed in rows, their tokens, the tokens cropped off, rows made, and the crop fraction."""
        s = dict(self._state["stats"])
        s["crop_fraction"] = s["cropped_tokens"] / s["doc_tokens"] if s["doc_tokens"] else 0.0
        return s

    # -- background reading and tokenizing --------------------------------

    def _encode(self, texts: list) -> list[tuple[int, str]]:
        """(length incl. BOS, base64 of the first seq_len + 1 ids) per non-empty document; runs on a worker thread."""
        texts = [t for t in texts if t]  # an empty document would only be a lone BOS
        keep = self.seq_len + 1  # a row never uses more of one document than this
        out = []
        for ids in self.tokenizer.batch_encode(texts):
            arr = np.empty(min(len(ids) + 1, keep), dtype=self.dtype)
            arr[0] = self.bos
            arr[1:] = ids[:keep - 1]
            out.append((len(ids) + 1, base64.b64encode(arr.tobytes()).decode("ascii")))
        return out

    def _after(self, epoch: int, unit: int, offset: int, size: int) -> tuple[int, int, int]:
        """The position that follows a chunk ending at `offset` of a unit of `size` documents."""
        if offset < size:
            return epoch, unit, offset
        if unit + 1 < len(self.units):
            return epoch, unit + 1, 0
        return (epoch + 1, 0, 0) if self.loop else (epoch, len(self.units), 0)

    def _produce(self, start, out: queue.Queue, stop: threading.Event, pool: ThreadPoolExecutor):
        """Read units from `start` on, hand chunks to the pool, queue (future, next position) in order."""
        import pyarrow.parquet as pq

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    pass
            return False

        epoch, unit, offset = start
        open_path, pf = None, None
        docs_this_pass, full_pass = 0, unit == 0 and offset == 0
        try:
            while not stop.is_set():
                if unit >= len(self.units):
                    if not self.loop:
                        break
                    if full_pass and docs_this_pass == 0:
                        raise DatasetError(f"{', '.join(map(str, self.paths))} hold no documents for rank {self.rank}")
                    epoch, unit, offset, docs_this_pass, full_pass = epoch + 1, 0, 0, 0, True
                    continue
                path, rg = self.units[unit]
                try:
                    if path != open_path:
                        pf, open_path = pq.ParquetFile(path), path
                    texts = pf.read_row_group(rg, columns=["text"]).column("text").to_pylist()
                except Exception as e:
                    raise DatasetError(f"{path}: row group {rg} could not be read ({e}); delete the file so that it is "
                                       "downloaded again, or re-create it if it came from --data-dir") from e
                if self.split == "documents":
                    texts = texts[self.rank::self.world_size]
                docs_this_pass += sum(1 for t in texts if t)
                for i in range(offset, len(texts), self.tokenizer_batch):
                    chunk = texts[i:i + self.tokenizer_batch]
                    nxt = self._after(epoch, unit, i + len(chunk), len(texts))
                    if not put((pool.submit(self._encode, chunk), nxt)):
                        return
                unit, offset = unit + 1, 0
        except BaseException as e:  # handed to the consumer, which raises it
            put(e)
            return
        put(_END)

    # -- iteration ----------------------------------------------------------

    def __iter__(self):
        """Batches from state_dict() on; a new iter() continues where the last batch left off."""
        start = self._state
        buffer = DocBuffer()
        for length, blob in zip(start["pending_lengths"], start["pending"]):
            buffer.add(length, blob)  # saved in key order, so renumbered arrivals keep every tie the same
        stats = dict(start["stats"])
        pos = (start["epoch"], start["unit"], start["offset"])
        B, T1 = self.batch_size, self.seq_len + 1
        pin = self.device.type == "cuda" and torch.cuda.is_available()

        stop = threading.Event()
        chunks: queue.Queue = queue.Queue(maxsize=max(4, 2 * self.threads))
        pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="loader-tok")
        producer = threading.Thread(target=self._produce, args=(pos, chunks, stop, pool), daemon=True,
                                    name="loader-read")
        producer.start()
        exhausted = False

        def refill():
            nonlocal exhausted, pos
            while len(buffer) < self.buffer_docs and not exhausted:
                item = chunks.get()
                if item is _END:
                    exhausted = True
                elif isinstance(item, BaseException):
                    raise item
                else:
                    future, nxt = item
                    for length, blob in future.result():
                        buffer.add(length, blob)
                    pos = nxt

        try:
            while True:
                rows = np.empty((B, T1), dtype=np.int64)
                for r in range(B):
                    if not pack_row(rows[r], buffer, refill, self.dtype, stats):
                        return  # finite loader: the last partial batch is dropped
                # inputs and targets side by side in one (pinned) buffer: a single host-to-device copy
                t = torch.from_numpy(rows)
                both = torch.empty((2, B, T1 - 1), dtype=torch.long, pin_memory=pin)
                both[0].copy_(t[:, :-1])
                both[1].copy_(t[:, 1:])
                if self.device.type != "cpu":
                    both = both.to(self.device, non_blocking=pin)
                self._state = {**self._state, "epoch": pos[0], "unit": pos[1], "offset": pos[2],
                               "pending": [k[2] for k in buffer.keys], "pending_lengths": [k[0] for k in buffer.keys],
                               "stats": dict(stats)}
                yield both[0], both[1], self._state
        finally:
            # Wait for the reader and the tokenizer threads: a thread still inside
            # pyarrow or tokenizers when the interpreter exits aborts the process
            # ("terminate called without an active exception"). The reader polls
            # `stop` every 0.1 s, so this takes at most one row group's read.
            stop.set()
            producer.join()
            pool.shutdown(wait=True, cancel_futures=True)


def val_batches(paths, tokenizer, batch_size: int, seq_len: int, max_tokens: int, rank: int = 0, world_size: int = 1,
                device="cpu", threads: int = 2, buffer_docs: int = 1000):
    """(inputs, targets) validation batches: at most max_tokens // (B * T * world_size) per rank (at least 1).

    Ranks take strides of documents rather than of row groups, so a small
    validation shard (the mirror's has one row group) still feeds every rank.
    Deterministic: the same arguments give the same batches every time.
    """
    steps = max(1, max_tokens // (batch_size * seq_len * world_size))
    loader = PretrainLoader(paths, tokenizer, batch_size, seq_len, rank=rank, world_size=world_size, device=device,
                            threads=threads, buffer_docs=buffer_docs, loop=False, split="documents")
    batches = iter(loader)
    try:
        for _ in range(steps):
            try:
                x, y, _state = next(batches)
            except StopIteration:
                return
            yield x, y
    finally:
        batches.close()


# ---------------------------------------------------------------------------
# prepare: your own corpus as shards in the upstream layout

SUFFIXES = (".txt", ".txt.gz", ".jsonl", ".jsonl.gz", ".parquet")
ROW_GROUP = 1024


def find_input_files(inputs) -> list[Path]:
    """The files to read: given files as they are, folders walked recursively (sorted, so the order is stable)."""
    files = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.rglob("*") if p.is_file() and p.name.lower().endswith(SUFFIXES)
                           and not any(part.startswith(".") for part in p.relative_to(item).parts))
            files += found
        elif item.is_file():
            if not item.name.lower().endswith(SUFFIXES):
                raise DatasetError(f"{item}: unsupported file type; use {', '.join(SUFFIXES)}")
            files.append(item)
        else:
            raise DatasetError(f"{item} does not exist")
    if not files:
        raise DatasetError(f"no {', '.join(SUFFIXES)} files found in {', '.join(map(str, inputs))}")
    return files


_BLANK_LINE = re.compile(r"\n(?:[ \t\f\v]*\n)+")  # one or more blank (or whitespace-only) lines


def _open_text(path: Path):
    # utf-8-sig drops a byte-order mark (Gutenberg files have one); text mode turns \r\n into \n
    return (gzip.open if path.name.lower().endswith(".gz") else open)(path, "rt", encoding="utf-8-sig")


def read_documents(path: Path, text_field: str = "text", doc_per_file: bool = False):
    """The non-empty documents of one input file, as a pyarrow array of strings."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    name = path.name.lower()
    try:
        if name.endswith(".parquet"):
            try:
                table = pq.read_table(path)
            except Exception as e:
                raise DatasetError(f"{path}: not a readable parquet file ({e})") from e
            if text_field not in table.column_names:
                raise DatasetError(f"{path}: no '{text_field}' column (columns: {table.column_names}); pass --text-field")
            column = table.column(text_field)
            if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
                raise DatasetError(f"{path}: column '{text_field}' holds {column.type}, not text")
            docs = column.combine_chunks().cast(pa.large_string())
            return docs.filter(pc.fill_null(pc.greater(pc.utf8_length(docs), 0), False))
        if name.endswith((".jsonl", ".jsonl.gz")):
            docs = []
            with _open_text(path) as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DatasetError(f"{path}:{lineno}: not valid JSON ({e})") from None
                    if not isinstance(obj, dict) or text_field not in obj:
                        keys = list(obj) if isinstance(obj, dict) else type(obj).__name__
                        raise DatasetError(f"{path}:{lineno}: no '{text_field}' field (found {keys}); pass --text-field")
                    text = obj[text_field]
                    if not isinstance(text, str):
                        raise DatasetError(f"{path}:{lineno}: '{text_field}' is {type(text).__name__}, not a string")
                    if text:
                        docs.append(text)
        else:
            with _open_text(path) as f:
                text = f.read()
            blocks = [text] if doc_per_file else _BLANK_LINE.split(text)
            docs = [b.strip("\n") for b in blocks if b.strip()]
    except DatasetError:
        raise
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not UTF-8 text ({e})") from None
    except (OSError, EOFError) as e:
        raise DatasetError(f"{path}: cannot read it ({e})") from None
    return pa.array(docs, type=pa.large_string())


def default_val_docs(n: int) -> int:
    """~1% of the documents, in whole row groups once that is at least one row group; at least 1."""
    v = n // 100
    return max(1, v // ROW_GROUP * ROW_GROUP if v >= ROW_GROUP else v)


def shard_bounds(chars: np.ndarray, shard_chars: int) -> list[tuple[int, int]]:
    """Cut documents into shards of >= shard_chars characters whose document count is a multiple of 1,024
    (so every row group is full), as upstream does; the last shard takes what is left."""
    n = len(chars)
    cum = np.concatenate([[0], np.cumsum(chars, dtype=np.int64)])
    bounds, start = [], 0
    for end in range(ROW_GROUP, n, ROW_GROUP):
        if cum[end] - cum[start] >= shard_chars:
            bounds.append((start, end))
            start = end
    bounds.append((start, n))
    return bounds


def _remove_stale_temps(out: Path):
    """Temp folders left by a killed prepare (their process is gone)."""
    for tmp in out.parent.glob(f".{out.name}.tmp-*"):
        try:
            os.kill(int(tmp.name.rsplit("-", 1)[1]), 0)
        except (ValueError, ProcessLookupError):
            shutil.rmtree(tmp, ignore_errors=True)
        except PermissionError:
            pass


def prepare(inputs, out, *, seed: int = 42, shard_chars: int = 250_000_000, val_docs: int | None = None,
            text_field: str = "text", doc_per_file: bool = False, force: bool = False, log=print) -> dict:
    """Write shuffled shards (last = validation) to `out`; returns a summary. Raises DatasetError on bad input."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    out = Path(out)
    if shard_chars < 1:
        raise DatasetError(f"--shard-chars must be at least 1, got {shard_chars}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise DatasetError(f"{out} exists and is not empty; choose another --out or pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise DatasetError(f"{out} is a file, not a folder")
    files = find_input_files(inputs)
    arrays = []
    for i, path in enumerate(files):
        arrays.append(read_documents(path, text_field, doc_per_file))
        if (i + 1) % 100 == 0:
            log(f"read {i + 1}/{len(files)} files")
    docs = pa.chunked_array(arrays, type=pa.large_string()).combine_chunks()
    n = len(docs)
    if n < 2:
        raise DatasetError(f"found {n} document(s) in {len(files)} file(s); need at least 2 (training + validation)")
    v = default_val_docs(n) if val_docs is None else val_docs
    if not 1 <= v < n:
        raise DatasetError(f"--val-docs must be between 1 and {n - 1} (the corpus has {n} documents), got {v}")

    order = list(range(n))
    random.Random(seed).shuffle(order)  # Python's shuffle is stable across versions and platforms
    order = pa.array(order, type=pa.int64())
    docs = docs.take(order)
    del order
    train, val = docs.slice(0, n - v), docs.slice(n - v)
    chars = pc.utf8_length(train).to_numpy()
    parts = [train.slice(a, b - a) for a, b in shard_bounds(chars, shard_chars)] + [val]

    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for i, part in enumerate(parts):
            table = pa.table({"text": part.cast(pa.string())})
            # the upstream shards' settings: 1,024-document row groups, zstd, no dictionary or statistics
            pq.write_table(table, tmp / f"shard_{i:05d}.parquet", row_group_size=ROW_GROUP, compression="zstd",
                           compression_level=3, use_dictionary=False, write_statistics=False)
        if out.exists():  # empty, or --force: swap, then delete the old one
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    total_chars = int(pc.sum(pc.utf8_length(docs)).as_py())
    return {"files": len(files), "docs": n, "chars": total_chars, "train_shards": len(parts) - 1,
            "train_docs": n - v, "val_docs": v, "val_chars": int(pc.sum(pc.utf8_length(val)).as_py()),
            "val_shard": f"shard_{len(parts) - 1:05d}.parquet", "out": str(out)}


# ---------------------------------------------------------------------------
# Command line


def measure(loader, batches: int) -> dict:
    """Tokens/s the loader yields over `batches` batches after the first (which waits for the buffer to fill)."""
    it = iter(loader)
    t_first = time.perf_counter()
    next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    dt = time.perf_counter() - t0
    it.close()
    tokens = batches * loader.batch_size * loader.seq_len
    return {"tok_per_sec": tokens / dt, "first_batch_s": t0 - t_first, **loader.stats}


def main(argv=None):
    parser = argparse.ArgumentParser(description="Pretraining data: prepare your own shards, or measure the loader.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="turn .txt/.jsonl/.parquet files (or .gz) into shuffled shards, last = validation")
    p.add_argument("--input", nargs="+", required=True, help="files or folders (walked recursively)")
    p.add_argument("--out", required=True, help="output folder for shard_00000.parquet ...")
    p.add_argument("--seed", type=int, default=42, help="shuffle seed")
    p.add_argument("--shard-chars", type=int, default=250_000_000, help="characters per training shard (upstream: 250M)")
    p.add_argument("--val-docs", type=int, default=None,
                   help="documents in the validation shard (default: ~1%%, in whole 1,024-row groups once that big; >= 1)")
    p.add_argument("--text-field", default="text", help="jsonl field / parquet column holding the text")
    p.add_argument("--doc-per-file", action="store_true", help=".txt: one document per file instead of per blank-line block")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    s = sub.add_parser("stats", help="tokens/s and crop waste of the loader on some shards")
    s.add_argument("--run-dir", required=True, help="run directory (or tokenizer folder) with the tokenizer")
    s.add_argument("--data-source", default="fineweb-edu", help="upstream corpus (ignored with --data-dir)")
    s.add_argument("--data-dir", default=None, help="your own prepared shards")
    s.add_argument("--num-shards", type=int, default=1, help="training shards to read")
    s.add_argument("--batch-size", type=int, default=8, help="rows per batch")
    s.add_argument("--seq-len", type=int, default=512, help="tokens per row (the model's context)")
    s.add_argument("--threads", type=int, default=2, help="tokenizer threads")
    s.add_argument("--batches", type=int, default=50, help="batches to time (after the first)")
    args = parser.parse_args(argv)

    try:
        if args.cmd == "prepare":
            r = prepare(args.input, args.out, seed=args.seed, shard_chars=args.shard_chars, val_docs=args.val_docs,
                        text_field=args.text_field, doc_per_file=args.doc_per_file, force=args.force)
            print(f"prepared {r['docs']:,} documents ({r['chars']:,} characters) from {r['files']} file(s) into {r['out']}")
            print(f"  train: {r['train_shards']} shard(s), {r['train_docs']:,} documents")
            print(f"  val:   {r['val_shard']}, {r['val_docs']:,} documents, {r['val_chars']:,} characters")
            print(f"use it with --data-dir {r['out']} (tok_train, base_train)")
            return 0
        from pipeline import dataset
        from gpt.tokenizer import Tokenizer

        tok = Tokenizer.from_dir(args.run_dir)
        shards = dataset.pretrain_shards(args.data_source, args.num_shards, args.data_dir)
        loader = PretrainLoader(shards.train, tok, args.batch_size, args.seq_len, threads=args.threads)
        r = measure(loader, args.batches)
        print(f"{r['tok_per_sec']:,.0f} tokens/s (B={args.batch_size}, T={args.seq_len}, {args.threads} thread(s)); "
              f"first batch after {r['first_batch_s']:.2f} s")
        print(f"{r['docs']:,} documents in {r['rows']:,} rows; {100 * r['crop_fraction']:.1f}% of their tokens cropped off")
        return 0
    except (DatasetError, FileNotFoundError) as e:
        parser.exit(2, f"error: {e}\n")


if __name__ == "__main__":
    sys.exit(main())
