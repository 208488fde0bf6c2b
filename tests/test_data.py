"""The pretraining loader (best-fit packing, rank striding, exact resume) and `gpt.data prepare`."""

import base64
import gzip
import json
import os
import random
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers import mirror
from gpt import data
from trainer import tok_train
from gpt.data import DocBuffer, PretrainLoader, pack_row, prepare, val_batches
from pipeline.dataset import DatasetError, pretrain_shards
from gpt.tokenizer import Tokenizer

B, T = 3, 32  # small rows: best fit, cropping and many chunk/file/epoch boundaries within a few dozen batches
SMALL = dict(buffer_docs=12, tokenizer_batch=5)


@pytest.fixture(scope="session")
def tok(tmp_path_factory):
    os.environ["NANOSTUDIO_DATA_MIRROR"] = str(mirror())
    run = tmp_path_factory.mktemp("datatok")
    assert tok_train.main(["--run-dir", str(run), "--vocab-size", "512", "--max-chars", "300000"]) == 0
    return Tokenizer.from_dir(run)


WORDS = "the of and to in is was for on that with as by at from river stone light house city water".split()


def make_doc(rng, tag):
    # a mix of short documents (fit several to a row) and long ones (only ever cropped)
    n = rng.choice([rng.randint(1, 6), rng.randint(6, 14), rng.randint(30, 60)])
    return f"{tag} " + " ".join(rng.choice(WORDS) for _ in range(n))


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """Three small shards with 2, 3 and 1 row groups of up to 10 documents; each text starts with its own tag."""
    folder = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    paths = []
    for f, groups in enumerate([2, 3, 1]):
        docs = []
        for g in range(groups):
            size = 10 if g < groups - 1 else 7  # a short last row group, like real shards
            docs += [make_doc(rng, f"<f{f}g{g}d{i}>") for i in range(size)]
        if f == 1:
            docs[3] = ""  # empty documents are skipped
        path = folder / f"shard_{f:05d}.parquet"
        pq.write_table(pa.table({"text": docs}), path, row_group_size=10)
        paths.append(path)
    return paths


def units_of(paths):
    """The documents of every (file, row group), in order."""
    out = []
    for path in paths:
        pf = pq.ParquetFile(path)
        out += [pf.read_row_group(g).column("text").to_pylist() for g in range(pf.num_row_groups)]
    return out


def naive_batches(tok, groups, batch_size, seq_len, buffer_docs, tokenizer_batch, epochs=1):
    """The packing rule written as plainly as possible (linear scans), to check the loader against."""
    chunks = []
    for _ in range(epochs):
        for texts in groups:
            for i in range(0, len(texts), tokenizer_batch):
                chunks.append([tok.encode(t, prepend=tok.bos_id) for t in texts[i:i + tokenizer_batch] if t])
    chunks = iter(chunks)
    buf, rows = [], []  # buf in arrival order
    while True:
        row = []
        while len(row) < seq_len + 1:
            while len(buf) < buffer_docs:
                chunk = next(chunks, None)
                if chunk is None:
                    break
                buf.extend(chunk)
            if not buf:
                n = len(rows) // batch_size * batch_size
                return [torch.tensor(rows[i:i + batch_size]) for i in range(0, n, batch_size)]
            room = seq_len + 1 - len(row)
            fits = [i for i, d in enumerate(buf) if len(d) <= room]
            if fits:  # the longest that fits (the newest of equals)
                i = max(fits, key=lambda i: (len(buf[i]), i))
            else:  # none fits: the shortest (the oldest of equals), cropped
                i = min(range(len(buf)), key=lambda i: (len(buf[i]), i))
            row += buf.pop(i)[:room]
        rows.append(row)


def take(loader, n):
    it = iter(loader)
    out = [next(it) for _ in range(n)]
    it.close()
    return out


def rows_of(batches):
    return [torch.cat([x, y[:, -1:]], dim=1) for x, y, *_ in batches]


# ---------------------------------------------------------------------------
# packing


def test_rows_are_best_fit_packed_bos_aligned_and_unpadded(tok, corpus):
    loader = PretrainLoader(corpus, tok, B, T, loop=False, threads=2, **SMALL)
    batches = list(loader)
    expected = naive_batches(tok, units_of(corpus), B, T, **SMALL)
    assert len(batches) == len(expected) > 5
    docs = {tuple(tok.encode(t, prepend=tok.bos_id)) for g in units_of(corpus) for t in g if t}
    used = set()
    for (x, y, state), want in zip(batches, expected):
        assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.int64
        assert x.is_contiguous() and y.is_contiguous()
        assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
        row = torch.cat([x, y[:, -1:]], dim=1)
        assert torch.equal(row, want)
        json.dumps(state)
        for r in row.tolist():
            assert r[0] == tok.bos_id  # every row starts a document, no padding anywhere
            starts = [i for i, t in enumerate(r) if t == tok.bos_id] + [len(r)]
            segments = [tuple(r[a:b]) for a, b in zip(starts, starts[1:])]
            for seg in segments[:-1]:
                assert seg in docs  # whole documents: BOS appears only where a document starts
            last = segments[-1]
            assert last in docs or any(d[:len(last)] == last and len(d) > len(last) for d in docs)
            for seg in segments:
                assert seg not in used or seg == (tok.bos_id,)  # no document is used twice (none split over rows)
                used.add(seg)
    s = loader.stats
    assert s["rows"] == len(batches) * B and 0 < s["crop_fraction"] < 1
    assert s["doc_tokens"] - s["cropped_tokens"] == s["rows"] * (T + 1)  # every kept token is in a row


def test_buffer_picks_largest_fit_then_shortest():
    buf = DocBuffer()
    for length in (5, 9, 3, 9, 20):
        buf.add(length, str(length))
    assert buf.take(10)[0] == 9 and buf.take(10)[0] == 9
    assert buf.take(4)[0] == 3
    assert buf.take(4) == (5, "5")  # nothing fits: the shortest, to be cropped
    assert buf.take(100) == (20, "20") and len(buf) == 0


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(1, 40), min_size=1, max_size=60), seq_len=st.integers(1, 24),
       buffer_docs=st.integers(1, 8))
def test_sorted_buffer_packs_like_a_linear_scan(lengths, seq_len, buffer_docs):
    # documents are runs of their own id, so which one went where is visible in the rows
    docs = [[i] * n for i, n in enumerate(lengths)]
    feed = iter(docs)
    buf, stats = DocBuffer(), {"docs": 0, "doc_tokens": 0, "cropped_tokens": 0, "rows": 0}

    def refill():
        while len(buf) < buffer_docs:
            d = next(feed, None)
            if d is None:
                return
            buf.add(len(d), base64.b64encode(np.array(d[:seq_len + 1], dtype=np.uint16).tobytes()).decode())

    rows = []
    while True:
        row = np.empty(seq_len + 1, dtype=np.int64)
        if not pack_row(row, buf, refill, np.uint16, stats):
            break
        rows.append(row.tolist())

    class Ids:  # a stand-in tokenizer for naive_batches: the "text" is the document itself
        bos_id = None

        @staticmethod
        def encode(doc, prepend=None):
            return list(doc)

    want = naive_batches(Ids, [docs], 1, seq_len, buffer_docs, tokenizer_batch=1)
    assert rows == [w[0].tolist() for w in want]


def test_ranks_read_disjoint_row_groups_that_cover_everything(tok, corpus):
    every = [u for u in PretrainLoader(corpus, tok, B, T).units]
    assert len(every) == 6
    groups = units_of(corpus)
    for world in (2, 3):
        seen = []
        for rank in range(world):
            loader = PretrainLoader(corpus, tok, 1, T, rank=rank, world_size=world, loop=False, **SMALL)
            assert loader.units == every[rank::world]
            seen += loader.units
            mine = [groups[i] for i in range(rank, len(groups), world)]
            got = rows_of(list(loader))
            assert torch.equal(torch.cat(got), torch.cat(naive_batches(tok, mine, 1, T, **SMALL)))
        assert sorted(seen) == sorted(every) and len(set(seen)) == len(seen)


def test_a_rank_without_row_groups_is_refused(tok, corpus):
    with pytest.raises(ValueError, match="rank 6 of 7 has no row groups.*6 row group"):
        PretrainLoader(corpus, tok, B, T, rank=6, world_size=7)


# ---------------------------------------------------------------------------
# exact resume


@pytest.mark.parametrize("threads", [1, 4])
def test_resume_is_exact_across_chunk_file_and_epoch_boundaries(tok, corpus, threads):
    straight = take(PretrainLoader(corpus, tok, B, T, threads=threads, **SMALL), 40)
    epochs = [s["epoch"] for _, _, s in straight]
    units = [s["unit"] for _, _, s in straight]
    assert epochs[-1] >= 2  # several passes over the data
    cut_epoch = epochs.index(1)  # the first state that points into the second pass
    cut_file = next(i for i in range(cut_epoch, 40) if units[i] >= 2)  # ... and into its second file
    for n in sorted({1, cut_epoch - 1, cut_epoch, cut_epoch + 1, cut_file - 1, cut_file, cut_file + 1, 33}):
        saved = json.loads(json.dumps(straight[n - 1][2]))
        resumed = take(PretrainLoader(corpus, tok, B, T, threads=threads, state=saved, **SMALL), 5)
        for (x, y, s), (x2, y2, s2) in zip(resumed, straight[n:n + 5]):
            assert torch.equal(x, x2) and torch.equal(y, y2), n
            assert s == s2
    # the multi-epoch stream is the data read again and again, packed by the same rule
    want = naive_batches(tok, units_of(corpus), B, T, epochs=epochs[-1] + 2, **SMALL)[:40]
    assert all(torch.equal(r, w) for r, w in zip(rows_of(straight), want))


def test_state_dict_follows_the_batches_and_a_new_iter_continues(tok, corpus):
    loader = PretrainLoader(corpus, tok, B, T, **SMALL)
    first = loader.state_dict()
    assert first["epoch"] == 0 and first["unit"] == 0 and first["pending"] == []
    got = take(loader, 3)
    assert loader.state_dict() == got[-1][2]
    more = take(loader, 2)  # continues from the last batch
    ref = take(PretrainLoader(corpus, tok, B, T, **SMALL), 5)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(got + more, ref))
    assert len(json.dumps(loader.state_dict())) < 50_000


def test_a_closed_or_finished_loader_leaves_no_threads(tok, corpus):
    def ours():
        return [t for t in threading.enumerate() if t.name.startswith("loader-")]

    take(PretrainLoader(corpus, tok, B, T, threads=3), 2)
    list(PretrainLoader(corpus, tok, B, T, threads=3, loop=False))
    deadline = time.time() + 5
    while ours() and time.time() < deadline:
        time.sleep(0.05)
    assert ours() == []


def test_same_batches_whatever_the_thread_count(tok, corpus):
    a = take(PretrainLoader(corpus, tok, B, T, threads=1), 12)
    b = take(PretrainLoader(corpus, tok, B, T, threads=4), 12)
    assert all(torch.equal(x[0], y[0]) and x[2] == y[2] for x, y in zip(a, b))


def test_a_state_from_another_setup_is_refused(tok, corpus):
    state = take(PretrainLoader(corpus, tok, B, T, **SMALL), 2)[-1][2]
    with pytest.raises(ValueError, match="seq_len"):
        PretrainLoader(corpus, tok, B, T * 2, state=state)
    with pytest.raises(ValueError, match="world_size"):
        PretrainLoader(corpus, tok, B, T, rank=0, world_size=2, state=state)
    with pytest.raises(ValueError, match="files"):
        PretrainLoader(corpus[:2], tok, B, T, state=state)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_equal_cpu_batches(tok, corpus):
    cpu = take(PretrainLoader(corpus, tok, B, T, **SMALL), 4)
    gpu = take(PretrainLoader(corpus, tok, B, T, device="cuda", **SMALL), 4)
    for (x, y, s), (gx, gy, gs) in zip(cpu, gpu):
        assert gx.is_cuda and gy.is_cuda and gx.is_contiguous() and gy.is_contiguous()
        assert torch.equal(x, gx.cpu()) and torch.equal(y, gy.cpu()) and s == gs


# ---------------------------------------------------------------------------
# validation


def test_val_loader_is_finite_and_repeatable(tok, corpus):
    once = list(PretrainLoader(corpus[2:], tok, B, T, loop=False))
    again = list(PretrainLoader(corpus[2:], tok, B, T, loop=False, threads=1))
    assert 0 < len(once) == len(again)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(once, again))


def test_val_batches_limit_and_feed_every_rank_of_a_one_row_group_shard(tok, corpus):
    val = corpus[2]  # one row group, like the mirror's validation shard
    got = list(val_batches([val], tok, 1, 8, max_tokens=3 * 8))
    assert len(got) == 3 and all(len(b) == 2 for b in got)
    assert len(list(val_batches([val], tok, 1, 8, max_tokens=1))) == 1  # at least one batch
    texts = pq.read_table(val).column("text").to_pylist()
    for world in (2, 3):
        for rank in range(world):  # rank r packs documents r, r + W, r + 2W, ...
            limit = 10_000 // (4 * world)
            got = [torch.cat([x, y[:, -1:]], dim=1) for x, y in
                   val_batches([val], tok, 1, 4, max_tokens=10_000, rank=rank, world_size=world)]
            want = naive_batches(tok, [texts[rank::world]], 1, 4, buffer_docs=1000, tokenizer_batch=128)[:limit]
            assert len(got) == len(want) > 0 and all(torch.equal(a, b) for a, b in zip(got, want))


# ---------------------------------------------------------------------------
# errors


def test_missing_and_corrupt_files_name_the_file_and_the_fix(tok, corpus, tmp_path):
    with pytest.raises(DatasetError, match=r"nope\.parquet does not exist; check --data-dir"):
        PretrainLoader([tmp_path / "nope.parquet"], tok, B, T)
    bad = tmp_path / "shard_00007.parquet"
    bad.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DatasetError, match=r"shard_00007\.parquet is not a readable parquet file.*delete it"):
        PretrainLoader([corpus[0], bad], tok, B, T)
    # a readable footer over damaged pages fails while reading, in the consumer's thread
    damaged = tmp_path / "shard_00008.parquet"
    rng = random.Random(0)
    pq.write_table(pa.table({"text": ["".join(rng.choices("abcdefgh ", k=3000)) for _ in range(20)]}), damaged,
                   row_group_size=10, compression="zstd")
    raw = bytearray(damaged.read_bytes())
    raw[4:400] = bytes(396)  # the first page's header and data
    damaged.write_bytes(bytes(raw))
    with pytest.raises(DatasetError, match=r"shard_00008\.parquet: row group 0 could not be read"):
        take(PretrainLoader([damaged], tok, B, T), 1)
    no_text = tmp_path / "other.parquet"
    pq.write_table(pa.table({"body": ["a"]}), no_text)
    with pytest.raises(DatasetError, match="no 'text' column"):
        PretrainLoader([no_text], tok, B, T)


@pytest.mark.parametrize("kwargs", [dict(batch_size=0), dict(seq_len=0), dict(threads=0), dict(rank=2, world_size=2)])
def test_bad_sizes_are_refused(tok, corpus, kwargs):
    args = {"batch_size": B, "seq_len": T, **kwargs}
    with pytest.raises(ValueError):
        PretrainLoader(corpus, tok, **args)


# ---------------------------------------------------------------------------
# the mirror's shards


def test_reads_the_mirror_shards(tok):
    shards = pretrain_shards("fineweb-edu", 5)
    assert shards.origin == "mirror"
    loader = PretrainLoader(shards.train, tok, 2, 64, threads=2, buffer_docs=64)
    assert len(loader.units) == 10
    x, y, state = take(loader, 2)[-1]
    assert (x[:, 0] == tok.bos_id).all() and state["epoch"] == 0
    # the buffer keeps at most seq_len + 1 ids (base64 of uint16) of each of its <= 64 + 127 documents
    assert len(json.dumps(state)) < (64 + 127) * (65 * 8 // 3 + 10) + 1000


@pytest.mark.slow
def test_measure_throughput_on_the_mirror(tok):
    """Not an assertion on speed: prints tokens/s for the report (pytest -s)."""
    shards = pretrain_shards("fineweb-edu", 5)
    for batch, seq in ((8, 256), (8, 512)):
        for threads in (1, 2):
            r = data.measure(PretrainLoader(shards.train, tok, batch, seq, threads=threads), 100)
            print(f"\nloader B={batch} T={seq} threads={threads}: {r['tok_per_sec']:,.0f} tok/s, "
                  f"first batch {r['first_batch_s']:.2f} s, cropped {100 * r['crop_fraction']:.0f}%")


# ---------------------------------------------------------------------------
# prepare


CHINESE = ["春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。", "床前明月光，疑是地上霜。举头望明月，低头思故乡。"]
KOREAN = ["안녕하세요. 오늘은 날씨가 좋습니다.", "나는 학교에 갑니다. 친구들과 함께 공부합니다."]


@pytest.fixture
def inputs(tmp_path):
    src = tmp_path / "in"
    (src / "nested").mkdir(parents=True)
    # two Gutenberg books (.txt.gz, CRLF, BOM) and the C4 sample (.jsonl.gz) from the mirror
    for name in ("pg11.txt.gz", "pg1661.txt.gz"):
        (src / name).write_bytes((mirror() / "pretrain" / "gutenberg" / name).read_bytes())
    (src / "nested" / "c4.jsonl.gz").write_bytes((mirror() / "pretrain" / "c4_demo" / "c4_demo.jsonl.gz").read_bytes())
    (src / "nested" / "cjk.txt").write_text("\n\n".join(CHINESE) + "\n\n  \n\n" + "\n\n".join(KOREAN) + "\n", encoding="utf-8")
    with gzip.open(src / "nested" / "more.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"text": "한국어 문서 하나", "id": 1}, ensure_ascii=False) + "\n\n")
    (src / "notes.md").write_text("not an input type, skipped in folders")
    return src


def shard_docs(folder):
    return [pq.read_table(p).column("text").to_pylist() for p in sorted(folder.glob("*.parquet"))]


def test_prepare_writes_the_upstream_layout(tok, inputs, tmp_path, capsys):
    out = tmp_path / "out"
    assert data.main(["prepare", "--input", str(inputs), "--out", str(out), "--shard-chars", "300000"]) == 0
    summary = capsys.readouterr().out
    files = sorted(p.name for p in out.iterdir())
    assert files == [f"shard_{i:05d}.parquet" for i in range(len(files))] and len(files) >= 3
    shards = shard_docs(out)
    n = sum(map(len, shards))
    assert f"prepared {n:,} documents" in summary
    assert len(shards[-1]) == n // 100  # the validation split is last, ~1% of the documents
    for i, p in enumerate(sorted(out.iterdir())):
        meta = pq.read_metadata(p)
        assert meta.schema.names == ["text"] and meta.row_group(0).column(0).compression == "ZSTD"
        sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        assert all(s == 1024 for s in sizes[:-1]) and sizes[-1] <= 1024
        if i < len(files) - 2:  # full training shards: whole row groups and at least --shard-chars
            assert sizes[-1] == 1024 and sum(map(len, shards[i])) >= 300_000
    docs = [d for s in shards for d in s]
    assert len(set(docs)) > 0.95 * len(docs) and "\r" not in "".join(docs) and "\ufeff" not in "".join(docs)
    for text in CHINESE + KOREAN + ["한국어 문서 하나"]:
        assert text in docs  # non-English text round-trips exactly
    assert not any(d.startswith("not an input") for d in docs)
    c4 = [json.loads(line)["text"] for line in gzip.open(mirror() / "pretrain" / "c4_demo" / "c4_demo.jsonl.gz", "rt")]
    assert set(c4) <= set(docs)
    # the rest of the project reads it
    found = pretrain_shards(data_dir=str(out), num_train=100)
    assert found.origin == "data-dir" and found.val.name == files[-1] and len(found.train) == len(files) - 1
    x, y, _ = take(PretrainLoader(found.train, tok, 2, 32, buffer_docs=50), 1)[0]
    assert (x[:, 0] == tok.bos_id).all()
    assert next(val_batches([found.val], tok, 2, 32, 64))[0].shape == (2, 32)


def test_prepare_shuffles_by_seed_and_refuses_to_overwrite(inputs, tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    prepare([inputs], a, seed=1, val_docs=7)
    prepare([inputs], b, seed=1, val_docs=7)
    prepare([inputs], c, seed=2, val_docs=7)
    assert shard_docs(a) == shard_docs(b) and len(shard_docs(a)[-1]) == 7
    assert shard_docs(a) != shard_docs(c) and sorted(sum(shard_docs(a), [])) == sorted(sum(shard_docs(c), []))
    with pytest.raises(DatasetError, match="not empty.*--force"):
        prepare([inputs], a, seed=3)
    prepare([inputs], a, seed=2, val_docs=7, force=True)
    assert shard_docs(a) == shard_docs(c)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp folders left


def test_prepare_one_document_per_file_and_a_killed_run_leaves_nothing(tmp_path, monkeypatch):
    src = tmp_path / "books"
    src.mkdir()
    for i in range(5):
        (src / f"b{i}.txt").write_text(f"Book {i}\n\nchapter one\n\nchapter two\n")
    r = prepare([src], tmp_path / "out", doc_per_file=True, val_docs=1)
    assert r["docs"] == 5 and r["train_shards"] == 1
    assert sorted(sum(shard_docs(tmp_path / "out"), [])) == [f"Book {i}\n\nchapter one\n\nchapter two" for i in range(5)]

    calls = []

    def dies(*args, **kwargs):
        calls.append(args)
        raise KeyboardInterrupt  # as if killed half way through writing

    monkeypatch.setattr(pq, "write_table", dies)
    with pytest.raises(KeyboardInterrupt):
        prepare([src], tmp_path / "half")
    assert calls and not (tmp_path / "half").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_prepare_bad_inputs_say_which_file_and_line(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="no .* files found"):
        prepare([empty], tmp_path / "o")
    with pytest.raises(DatasetError, match="does not exist"):
        prepare([tmp_path / "missing.txt"], tmp_path / "o")
    lines = tmp_path / "x.jsonl"
    lines.write_text('{"text": "fine"}\n{"body": "no text here"}\n')
    with pytest.raises(DatasetError, match=r"x\.jsonl:2: no 'text' field .*--text-field"):
        prepare([lines], tmp_path / "o")
    other = tmp_path / "w.jsonl"
    other.write_text('{"body": "one"}\n{"body": "two"}\n')
    assert prepare([other], tmp_path / "o", text_field="body", val_docs=1)["docs"] == 2
    broken = tmp_path / "y.txt.gz"
    broken.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(DatasetError, match=r"y\.txt\.gz: cannot read it"):
        prepare([broken], tmp_path / "o2")
    latin = tmp_path / "z.txt"
    latin.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DatasetError, match=r"z\.txt: not UTF-8"):
        prepare([latin], tmp_path / "o3")
    with pytest.raises(SystemExit) as e:
        data.main(["prepare", "--input", str(lines), "--out", str(tmp_path / "o4")])
    assert e.value.code == 2 and "x.jsonl:2" in capsys.readouterr().err
