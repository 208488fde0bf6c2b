"""Where datasets come from: upstream downloads, the local cache, the offline mirror.

Pretraining text comes as parquet shards (one `text` column, row groups of
1,024 documents, ~250M characters per shard). The last shard of a corpus is
the validation split and is always the same file, whatever number of training
shards a run asks for.

Resolution order for the pretraining shards of a run:
  1. `--data-dir DIR`: your own prepared shards (sorted *.parquet, last = validation);
  2. `NANOSTUDIO_DATA_MIRROR`: a local folder laid out like shared/data
     (its `pretrain/sample-shards/` stands in for every upstream corpus);
  3. download from upstream into the cache (`NANOSTUDIO_CACHE`, default
     ~/.cache/nanostudio), in parallel, with retries and backoff, resuming a
     partial `.tmp` file with an HTTP Range request, verifying the SHA-256
     the server advertises (Hugging Face sends it as X-Linked-ETag for
     LFS files), then renaming into place.

Usage:
    python -m pipeline.dataset shards --source fineweb-edu -n 8     # download 8 train shards + val
    python -m pipeline.dataset where --source climbmix               # print what a run would read
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import os
import random
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import requests

MIRROR_ENV = "NANOSTUDIO_DATA_MIRROR"
CACHE_ENV = "NANOSTUDIO_CACHE"
MIRROR_SHARDS = "pretrain/sample-shards"


class DatasetError(RuntimeError):
    """A dataset could not be found or fetched; the message says what to do."""


@dataclass(frozen=True)
class Source:
    name: str
    url_pattern: str  # format with index=
    last_shard: int  # index of the validation shard upstream

    def url(self, index: int) -> str:
        return self.url_pattern.format(index=index)

    @staticmethod
    def filename(index: int) -> str:
        return f"shard_{index:05d}.parquet"


SOURCES = {
    "fineweb-edu": Source(
        "fineweb-edu",
        "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main/shard_{index:05d}.parquet",
        1822,
    ),
    "climbmix": Source(
        "climbmix",
        "https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main/shard_{index:05d}.parquet",
        6542,
    ),
}


def mirror_root() -> Path | None:
    value = os.environ.get(MIRROR_ENV, "").strip()
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        raise DatasetError(f"{MIRROR_ENV}={value} is not a directory; point it at a folder laid out like shared/data or unset it")
    return path


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "nanostudio").expanduser()


# ---------------------------------------------------------------------------
# Downloading


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def _advertised_sha256(headers) -> str | None:
    # Hugging Face serves LFS files with the content's SHA-256 as the linked ETag.
    for key in ("X-Linked-ETag", "ETag"):
        value = headers.get(key, "").strip().strip('"').removeprefix("W/").strip('"').lower()
        if _HEX64.match(value):
            return value
    return None


def download_file(url: str, dest: str | os.PathLike, *, sha256: str | None = None, retries: int = 5,
                  backoff: float = 2.0, timeout: float = 60.0, session: requests.Session | None = None,
                  progress=None) -> Path:
    """Fetch `url` to `dest` unless it is already there; return the path.

    Streams into `dest.tmp`; after a dropped connection the next attempt asks
    for the rest with a Range header, so a 100 MB shard is not restarted from
    zero. The checksum (given, or advertised by the server) is verified
    before the rename, so a file at `dest` is always complete.
    """
    dest = Path(dest)
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    http = session or requests.Session()
    last_error: Exception | None = None
    for attempt in range(1, retries + 1):
        try:
            have = tmp.stat().st_size if tmp.exists() else 0
            headers = {"Range": f"bytes={have}-"} if have else {}
            with http.get(url, stream=True, timeout=timeout, headers=headers, allow_redirects=True) as r:
                if r.status_code == 416:  # we already have every byte
                    pass
                elif r.status_code == 404:
                    raise DatasetError(f"{url} does not exist upstream (HTTP 404)")
                else:
                    r.raise_for_status()
                    expected = sha256 or _advertised_sha256(r.headers)
                    mode = "ab" if have and r.status_code == 206 else "wb"
                    with open(tmp, mode) as f:
                        for chunk in r.iter_content(chunk_size=1 << 16):
                            f.write(chunk)
                            if progress is not None:
                                progress(len(chunk))
                    sha256 = expected
            if sha256:
                got = _sha256(tmp)
                if got != sha256.lower():
                    tmp.unlink(missing_ok=True)
                    raise IOError(f"checksum mismatch for {url}: expected {sha256}, got {got}")
            os.replace(tmp, dest)
            return dest
        except DatasetError:
            raise
        except (requests.RequestException, IOError) as e:
            last_error = e
            if attempt < retries:
                # Exponential backoff with jitter so parallel workers do not retry in lockstep.
                time.sleep(backoff ** attempt * (0.5 + random.random() / 2) if backoff > 0 else 0)
    raise DatasetError(f"could not download {url} after {retries} attempts: {last_error}")


def download_many(jobs: list[tuple[str, Path]], workers: int = 8, desc: str = "download", **kwargs) -> list[Path]:
    """Download (url, dest) pairs in parallel with one progress bar; order is kept."""
    from tqdm import tqdm

    todo = [(u, Path(d)) for u, d in jobs if not Path(d).exists()]
    results: dict[Path, Path] = {}
    if todo:
        with tqdm(total=len(todo), desc=desc, unit="file", disable=not sys.stderr.isatty()) as bar, \
                ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            futures = {pool.submit(download_file, u, d, **kwargs): d for u, d in todo}
            for fut in as_completed(futures):
                results[futures[fut]] = fut.result()
                bar.update(1)
    return [Path(d) for _, d in jobs]


# ---------------------------------------------------------------------------
# Pretraining shards


@dataclass
class Shards:
    train: list[Path]
    val: Path
    origin: str  # "data-dir", "mirror" or "download"
    note: str = ""


def _shards_in(folder: Path, what: str) -> list[Path]:
    files = sorted(folder.glob("*.parquet"))
    if len(files) < 2:
        raise DatasetError(
            f"{what} {folder} holds {len(files)} parquet file(s); need at least 2 (training shards + the last one for validation). "
            "Prepare your own corpus with `python -m gpt.data prepare --input ... --out DIR`."
        )
    return files


def pretrain_shards(source: str = "fineweb-edu", num_train: int = 1, data_dir: str | None = None,
                    download: bool = True, workers: int = 8) -> Shards:
    """Locate (and if needed fetch) `num_train` training shards plus the validation shard."""
    if num_train < 1:
        raise DatasetError(f"num_train must be at least 1, got {num_train}")
    if data_dir:
        folder = Path(data_dir).expanduser()
        if not folder.is_dir():
            raise DatasetError(f"--data-dir {folder} does not exist")
        files = _shards_in(folder, "--data-dir")
        train = files[:-1][:num_train]
        note = "" if len(files) - 1 >= num_train else f"asked for {num_train} training shards, {folder} has {len(files) - 1}"
        return Shards(train, files[-1], "data-dir", note)
    if source not in SOURCES:
        raise DatasetError(f"unknown data source {source!r}; choose from {', '.join(SOURCES)}")
    mirror = mirror_root()
    if mirror is not None and (mirror / MIRROR_SHARDS).is_dir():
        files = _shards_in(mirror / MIRROR_SHARDS, "mirror folder")
        train = files[:-1][:num_train]
        note = f"offline mirror stands in for {source}"
        if len(files) - 1 < num_train:
            note += f"; it has {len(files) - 1} training shards, fewer than the {num_train} asked for"
        return Shards(train, files[-1], "mirror", note)
    src = SOURCES[source]
    folder = cache_root() / source
    wanted = list(range(min(num_train, src.last_shard))) + [src.last_shard]
    jobs = [(src.url(i), folder / src.filename(i)) for i in wanted]
    if not download:
        missing = [d for _, d in jobs if not d.exists()]
        if missing:
            raise DatasetError(f"{len(missing)} shard(s) of {source} are not in {folder} and downloading is off")
    else:
        try:
            download_many(jobs, workers=workers, desc=f"{source} shards")
        except DatasetError as e:
            looked = f"{MIRROR_ENV} ({'unset' if mirror is None else mirror / MIRROR_SHARDS})"
            raise DatasetError(f"pretraining shards for {source} not found: looked in {looked} and upstream: {e}") from e
    paths = [d for _, d in jobs]
    return Shards(paths[:-1], paths[-1], "download")


def text_shards(source: str, max_chars: int, data_dir: str | None = None, num_train: int | None = None) -> Shards:
    """Training shards to read `max_chars` characters from (tokenizer training).

    Upstream shards hold ~250M characters, so that many are downloaded. Local
    shards (the mirror, your own --data-dir) can be any size and cost nothing
    to list, so all of them are offered and the reader stops at max_chars.
    """
    needed = num_train or max(1, -(-max_chars // 250_000_000))
    shards = pretrain_shards(source, needed, data_dir)
    if shards.origin != "download" and num_train is None:
        local = pretrain_shards(source, 1 << 30, data_dir)
        local.note = shards.note.split(";")[0] if shards.origin == "mirror" else ""
        shards = local
    return shards


def iter_parquet_texts(paths):
    """Yield the `text` of every document in the given shards, row group by row group."""
    import pyarrow.parquet as pq

    for path in paths:
        try:
            pf = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises several types for a damaged file
            raise DatasetError(f"{path} is not a readable parquet file ({e}); delete it to re-download") from e
        if "text" not in pf.schema_arrow.names:
            raise DatasetError(f"{path} has no 'text' column (columns: {pf.schema_arrow.names})")
        for rg in range(pf.num_row_groups):
            yield from pf.read_row_group(rg, columns=["text"]).column("text").to_pylist()


def iter_training_text(paths, max_chars: int, doc_cap: int, on_progress=None, every: int = 1 << 24):
    """Documents cropped to `doc_cap` characters until `max_chars` are consumed.

    `on_progress(chars, docs)` is called every `every` characters: the
    tokenizer trainer is a black box while it runs, this is the progress
    the studio can show.
    """
    chars = docs = reported = 0
    next_report = every
    for text in iter_parquet_texts(paths):
        if not text:
            continue
        text = text[:doc_cap]
        if chars + len(text) > max_chars:
            text = text[: max_chars - chars]
        chars += len(text)
        docs += 1
        yield text
        if on_progress is not None and chars >= next_report:
            on_progress(chars, docs)
            reported = chars
            next_report += every
        if chars >= max_chars:
            break
    if on_progress is not None and reported != chars:
        on_progress(chars, docs)


# ---------------------------------------------------------------------------
# Other datasets (evaluation and chat data), by their path in the mirror layout


def _open_maybe_gzip(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def open_text(mirror_path: str, url: str | None = None, sha256: str | None = None):
    """Open a dataset file by its path in the mirror layout (e.g. 'gsm8k/test.jsonl').

    Looks for the file, or its `.gz` form, in the mirror, then in the cache,
    then downloads `url` into the cache (checked against `sha256` when given).
    Returns a text file object; a `.gz` file is decompressed wherever it came from.
    """
    candidates = []
    mirror = mirror_root()
    roots = ([mirror] if mirror else []) + [cache_root() / "datasets"]
    for root in roots:
        for name in (mirror_path, mirror_path + ".gz"):
            candidates.append(root / name)
            if (root / name).exists():
                return _open_maybe_gzip(root / name)
    if url:
        dest = cache_root() / "datasets" / mirror_path
        download_file(url, dest, sha256=sha256)
        return _open_maybe_gzip(dest)
    raise DatasetError(
        f"dataset file {mirror_path!r} not found; looked for: {', '.join(map(str, candidates))}. "
        f"Set {MIRROR_ENV} to a folder laid out like shared/data."
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description="Fetch or locate pretraining shards.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in ("shards", "where"):
        p = sub.add_parser(name, help="download shards" if name == "shards" else "print where shards would come from")
        p.add_argument("--source", default="fineweb-edu", choices=sorted(SOURCES), help="upstream corpus")
        p.add_argument("-n", "--num-train", type=int, default=1, help="training shards (the validation shard comes extra)")
        p.add_argument("--data-dir", default=None, help="your own prepared shards instead")
        p.add_argument("--workers", type=int, default=8, help="parallel downloads")
    args = parser.parse_args(argv)
    try:
        shards = pretrain_shards(args.source, args.num_train, args.data_dir, download=args.cmd == "shards", workers=args.workers)
    except DatasetError as e:
        parser.exit(2, f"error: {e}\n")
    print(f"origin: {shards.origin} {shards.note}".rstrip())
    for p in shards.train:
        print("train", p)
    print("val  ", shards.val)


if __name__ == "__main__":
    main()
