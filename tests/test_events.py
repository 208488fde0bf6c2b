import json
import multiprocessing as mp

from pipeline.events import EventWriter, read_events, write_json_atomic


def test_events_have_sequence_numbers_and_resume_from_offset(tmp_path):
    w = EventWriter(tmp_path, "tok_train")
    w.start()
    w.metric(step=1, loss=2.5)
    events, off = read_events(tmp_path)
    assert [e["seq"] for e in events] == [1, 2]
    assert events[1]["stage"] == "tok_train" and events[1]["kind"] == "metric" and events[1]["loss"] == 2.5
    w.metric(step=2, loss=2.0)
    more, off2 = read_events(tmp_path, off)
    assert [e["seq"] for e in more] == [3] and more[0]["step"] == 2
    assert read_events(tmp_path, off2) == ([], off2)


def test_a_torn_last_line_is_left_for_later(tmp_path):
    w = EventWriter(tmp_path, "s")
    w.metric(step=1)
    with open(tmp_path / "events.jsonl", "ab") as f:
        f.write(b'{"time": 1, "stage": "s", "ki')  # a writer killed mid-line
    events, off = read_events(tmp_path)
    assert len(events) == 1
    with open(tmp_path / "events.jsonl", "ab") as f:
        f.write(b'nd": "metric", "step": 2}\n')
    events, _ = read_events(tmp_path, off)
    assert events[0]["step"] == 2 and events[0]["seq"] == 2


def test_corrupt_line_in_the_middle_does_not_stop_the_reader(tmp_path):
    (tmp_path / "events.jsonl").write_bytes(b'{"kind": "a"}\nnot json\n{"kind": "b"}\n')
    events, _ = read_events(tmp_path)
    assert [e["kind"] for e in events] == ["a", "corrupt", "b"]


def _writer(path, n, tag):
    w = EventWriter(path, tag)
    for i in range(n):
        w.metric(i=i, pad="x" * 500)


def test_concurrent_writers_never_interleave_lines(tmp_path):
    procs = [mp.Process(target=_writer, args=(tmp_path, 300, f"w{k}")) for k in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    events, _ = read_events(tmp_path)
    assert len(events) == 900 and not any(e["kind"] == "corrupt" for e in events)


def test_missing_file_reads_as_empty(tmp_path):
    assert read_events(tmp_path / "nope") == ([], 0)


def test_atomic_json_write_replaces_whole_file(tmp_path):
    write_json_atomic(tmp_path / "c.json", {"a": 1})
    write_json_atomic(tmp_path / "c.json", {"b": 2})
    assert json.loads((tmp_path / "c.json").read_text()) == {"b": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["c.json"]


def test_a_stage_called_as_a_function_leaves_the_callers_signal_handlers(tmp_path, monkeypatch):
    import signal

    from tests.helpers import mirror
    from trainer import tok_train

    monkeypatch.setenv("NANOSTUDIO_DATA_MIRROR", str(mirror()))
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    assert tok_train.main(["--run-dir", str(tmp_path), "--vocab-size", "300", "--max-chars", "20000", "--doc-cap", "2000"]) == 0
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
