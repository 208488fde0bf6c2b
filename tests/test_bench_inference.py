"""bench/inference.py runs end to end at a tiny shape and records both engines at batch 1 and 8."""

import importlib.util
import json

import pytest

from tests.helpers import REPO

pytest.importorskip("transformers")


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_inference", REPO / "bench" / "inference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_run_records_both_engines_at_batch_1_and_8(tmp_path, torch_one_thread):
    bench = load_bench()
    out = tmp_path / "inference.json"
    bench.main(["--depth", "1", "--vocab", "512", "--sequence-len", "64", "--prompt-len", "8", "--new-tokens", "4",
                "--repeats", "1", "--threads", "1", "--out", str(out)])

    report = json.loads(out.read_text())
    assert report["machine"]["torch_threads"] == 1
    (result,) = report["results"]
    assert set(result["batches"]) == {"1", "8"}
    for row in result["batches"].values():
        for engine in ("ours", "transformers"):
            assert row[engine]["ttft_s"] > 0
            assert row[engine]["decode_tok_per_s"] > 0
    assert out.with_suffix(".md").read_text().count("decode tokens/s") == 2
