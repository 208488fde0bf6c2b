"""Downloads against a real local HTTP server; shard lookup against the offline mirror."""

import hashlib
import http.server
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.helpers import mirror
from pipeline import dataset
from pipeline.dataset import DatasetError


class Server:
    """A local file server with Range support, scripted failures and checksum headers."""

    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.fail_next = {}  # path -> number of requests to answer with 503
        self.cut_after = {}  # path -> bytes after which to drop the connection (once)
        self.requests = []
        self.bad_checksum = set()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                server.requests.append((self.path, self.headers.get("Range")))
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                if server.fail_next.get(self.path, 0) > 0:
                    server.fail_next[self.path] -= 1
                    self.send_error(503)
                    return
                start = 0
                rng = self.headers.get("Range")
                if rng:
                    start = int(rng.split("=")[1].split("-")[0])
                    if start >= len(body):
                        self.send_response(416)
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                digest = hashlib.sha256(body).hexdigest()
                if self.path in server.bad_checksum:
                    digest = "0" * 64
                self.send_header("X-Linked-ETag", f'"{digest}"')
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                cut = server.cut_after.pop(self.path, None)
                if cut is not None:
                    self.wfile.write(body[start:cut])
                    self.wfile.flush()
                    self.connection.shutdown(2)
                    return
                self.wfile.write(body[start:])

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


@pytest.fixture
def server():
    blob = bytes(range(256)) * 4000  # ~1 MB
    s = Server({"/a.bin": blob, "/b.bin": blob[::-1]})
    yield s
    s.close()


def test_download_verifies_the_advertised_checksum_and_renames(server, tmp_path):
    dest = dataset.download_file(server.url + "/a.bin", tmp_path / "a.bin")
    assert dest.read_bytes() == server.files["/a.bin"]
    assert not (tmp_path / "a.bin.tmp").exists()
    n = len(server.requests)
    dataset.download_file(server.url + "/a.bin", tmp_path / "a.bin")  # cached: no request
    assert len(server.requests) == n


def test_transient_errors_are_retried_with_backoff(server, tmp_path):
    server.fail_next["/a.bin"] = 2
    dataset.download_file(server.url + "/a.bin", tmp_path / "a.bin", backoff=0.01)
    assert [p for p, _ in server.requests].count("/a.bin") == 3


def test_dropped_connection_resumes_with_a_range_request(server, tmp_path):
    server.cut_after["/a.bin"] = 300_000
    dest = dataset.download_file(server.url + "/a.bin", tmp_path / "a.bin", backoff=0.01)
    assert dest.read_bytes() == server.files["/a.bin"]
    ranges = [r for p, r in server.requests if p == "/a.bin"]
    assert ranges[0] is None and len(ranges) == 2
    resumed_from = int(ranges[1].removeprefix("bytes=").rstrip("-"))
    assert 200_000 <= resumed_from <= 300_000  # what arrived before the cut is kept


def test_checksum_mismatch_never_leaves_a_file(server, tmp_path):
    server.bad_checksum.add("/a.bin")
    with pytest.raises(DatasetError, match="checksum mismatch"):
        dataset.download_file(server.url + "/a.bin", tmp_path / "a.bin", retries=2, backoff=0.01)
    assert not (tmp_path / "a.bin").exists() and not (tmp_path / "a.bin.tmp").exists()


def test_missing_upstream_file_fails_at_once_with_the_url(server, tmp_path):
    with pytest.raises(DatasetError, match="404"):
        dataset.download_file(server.url + "/nope.bin", tmp_path / "nope.bin")
    assert [p for p, _ in server.requests] == ["/nope.bin"]


def test_parallel_download_keeps_order(server, tmp_path):
    jobs = [(server.url + "/a.bin", tmp_path / "1"), (server.url + "/b.bin", tmp_path / "2")]
    paths = dataset.download_many(jobs, workers=2)
    assert [p.read_bytes() for p in paths] == [server.files["/a.bin"], server.files["/b.bin"]]


def test_upstream_shards_are_fetched_into_the_cache_with_the_fixed_validation_shard(server, tmp_path, monkeypatch):
    for i in (0, 1, 7):
        server.files[f"/shard_{i:05d}.parquet"] = f"shard {i}".encode()
    monkeypatch.setitem(dataset.SOURCES, "fake", dataset.Source("fake", server.url + "/shard_{index:05d}.parquet", 7))
    monkeypatch.delenv(dataset.MIRROR_ENV, raising=False)
    monkeypatch.setenv(dataset.CACHE_ENV, str(tmp_path))
    shards = dataset.pretrain_shards("fake", 2)
    assert shards.origin == "download"
    assert [p.name for p in shards.train] == ["shard_00000.parquet", "shard_00001.parquet"]
    assert shards.val.name == "shard_00007.parquet" and shards.val.read_bytes() == b"shard 7"


def test_shards_missing_everywhere_give_one_clear_error(server, tmp_path, monkeypatch):
    monkeypatch.setitem(dataset.SOURCES, "fake", dataset.Source("fake", server.url + "/gone_{index:05d}.parquet", 3))
    monkeypatch.delenv(dataset.MIRROR_ENV, raising=False)
    monkeypatch.setenv(dataset.CACHE_ENV, str(tmp_path))
    with pytest.raises(DatasetError) as err:
        dataset.pretrain_shards("fake", 1)
    assert "NANOSTUDIO_DATA_MIRROR" in str(err.value) and "gone_0000" in str(err.value)


def test_mirror_stands_in_for_upstream(monkeypatch):
    monkeypatch.setenv(dataset.MIRROR_ENV, str(mirror()))
    shards = dataset.pretrain_shards("climbmix", 3)
    assert shards.origin == "mirror"
    assert len(shards.train) == 3 and shards.val.name == "shard_00005.parquet"
    many = dataset.pretrain_shards("fineweb-edu", 100)
    assert len(many.train) == 5 and "fewer" in many.note and many.val == shards.val


def test_mirror_that_is_not_a_folder_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv(dataset.MIRROR_ENV, str(tmp_path / "missing"))
    with pytest.raises(DatasetError, match="NANOSTUDIO_DATA_MIRROR"):
        dataset.pretrain_shards("fineweb-edu", 1)


def test_own_data_dir_and_its_errors(tmp_path):
    for i in range(3):
        pq.write_table(pa.table({"text": [f"doc {i} {j}" for j in range(5)]}), tmp_path / f"shard_{i:05d}.parquet")
    shards = dataset.pretrain_shards(data_dir=str(tmp_path), num_train=5)
    assert len(shards.train) == 2 and shards.val.name == "shard_00002.parquet" and "has 2" in shards.note
    texts = list(dataset.iter_parquet_texts(shards.train))
    assert texts[0] == "doc 0 0" and len(texts) == 10
    with pytest.raises(DatasetError, match="does not exist"):
        dataset.pretrain_shards(data_dir=str(tmp_path / "nope"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="gpt.data prepare"):
        dataset.pretrain_shards(data_dir=str(empty))


def test_corrupt_shard_is_named(tmp_path):
    bad = tmp_path / "shard_00000.parquet"
    bad.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DatasetError, match="not a readable parquet"):
        list(dataset.iter_parquet_texts([bad]))


def test_training_text_respects_doc_cap_and_max_chars():
    shards = dataset.pretrain_shards(data_dir=str(mirror() / "pretrain" / "sample-shards"))
    seen = []
    texts = list(dataset.iter_training_text(shards.train, 50_000, 1_000, on_progress=lambda c, d: seen.append(c), every=10_000))
    assert sum(map(len, texts)) == 50_000 and max(map(len, texts)) <= 1_000
    assert seen[-1] == 50_000 and len(seen) >= 5


def test_open_text_finds_gzipped_mirror_files_and_names_what_it_looked_for(monkeypatch, tmp_path):
    monkeypatch.setenv(dataset.MIRROR_ENV, str(mirror()))
    monkeypatch.setenv(dataset.CACHE_ENV, str(tmp_path))
    with dataset.open_text("gsm8k/test.jsonl") as f:
        assert f.readline().startswith("{")
    with pytest.raises(DatasetError, match="nothing/here.jsonl"):
        dataset.open_text("nothing/here.jsonl")


def test_open_text_downloads_a_gzipped_file_and_returns_its_text(monkeypatch, tmp_path):
    import gzip
    import hashlib

    body = gzip.compress(b'{"task_id": "x"}\n')
    s = Server({"/HumanEval.jsonl.gz": body})
    try:
        monkeypatch.delenv(dataset.MIRROR_ENV, raising=False)
        monkeypatch.setenv(dataset.CACHE_ENV, str(tmp_path))
        url = s.url + "/HumanEval.jsonl.gz"
        with dataset.open_text("humaneval/HumanEval.jsonl.gz", url, sha256=hashlib.sha256(body).hexdigest()) as f:
            assert f.read() == '{"task_id": "x"}\n'  # text on first use, not gzip bytes
        with dataset.open_text("humaneval/HumanEval.jsonl.gz") as f:  # and from the cache afterwards
            assert f.read() == '{"task_id": "x"}\n'
    finally:
        s.close()


def test_tokenizer_text_comes_from_every_local_shard_but_only_the_needed_downloads(monkeypatch, server, tmp_path):
    monkeypatch.setenv(dataset.MIRROR_ENV, str(mirror()))
    local = dataset.text_shards("fineweb-edu", 20_000_000)
    assert len(local.train) == 5 and local.origin == "mirror"
    assert len(dataset.text_shards("fineweb-edu", 20_000_000, num_train=2).train) == 2
    for i in (0, 1, 2, 9):
        server.files[f"/shard_{i:05d}.parquet"] = b"x"
    monkeypatch.setitem(dataset.SOURCES, "fake", dataset.Source("fake", server.url + "/shard_{index:05d}.parquet", 9))
    monkeypatch.delenv(dataset.MIRROR_ENV)
    monkeypatch.setenv(dataset.CACHE_ENV, str(tmp_path))
    remote = dataset.text_shards("fake", 600_000_000)  # ~250M chars per upstream shard -> 3
    assert [p.name for p in remote.train] == [f"shard_{i:05d}.parquet" for i in range(3)]
