"""Issue 26, the bad-input and fault sweep of the newer surfaces: calibration objectives checked
before any work, ``cache`` failing when it stored nothing, text that is not valid Unicode refused
where it enters, the KV store after a killed writer, exact usage, messages that name what the
user set, contradictory pooling specs, one exit-code convention."""

from __future__ import annotations

import pytest

from nbce_rag.cli import main
from nbce_rag.errors import CalibrationError
from nbce_rag.filtering.objective import parse_objective

from conftest import N, save_tiny_llama  # noqa: E402,F401


def _rc(argv) -> int:
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


@pytest.fixture()
def no_loading(monkeypatch):
    """Loading a model or an index fails the test: options must be refused before."""
    import nbce_rag.decoding.decoder
    import nbce_rag.models
    import nbce_rag.retrieval.index

    def boom(*a, **k):
        raise AssertionError("something was loaded before the options were checked")

    monkeypatch.setattr(nbce_rag.models, "load_model", boom)
    monkeypatch.setattr(nbce_rag.decoding.decoder.NBCEDecoder, "from_pretrained", classmethod(boom))
    monkeypatch.setattr(nbce_rag.retrieval.index.VectorIndex, "load", classmethod(boom))


# ------------------------------------------------------------------------------ objectives
@pytest.mark.parametrize("spec", ["coverage1.5", "coverage90", "coverage150%", "coverage0", "coverage0%", "coverage%"])
def test_coverage_target_out_of_range_is_refused_never_rescaled(spec):
    with pytest.raises(CalibrationError, match="coverage"):
        parse_objective(spec)


@pytest.mark.parametrize("spec, target", [("coverage0.9", 0.9), ("coverage90%", 0.9), ("coverage_95%", 0.95),
                                          ("coverage1", 1.0), ("coverage100%", 1.0), ("coverage", 0.9)])
def test_coverage_target_as_share_or_explicit_percentage(spec, target):
    obj = parse_objective(spec)
    assert obj.kind == "coverage" and obj.target == pytest.approx(target)
    assert parse_objective(obj.name) == obj  # the stored name reads back as the same objective


@pytest.mark.parametrize("argv, says", [
    (["calibrate", "--synthetic", "--index", "idx", "--objective", "coverage1.5"], "--objective"),
    (["calibrate", "--index", "i", "--queries", "q", "--qrels", "r", "--objective", "coverage90"], "--objective"),
    (["calibrate", "--synthetic", "--index", "idx", "--n", "0"], "--n"),
    (["calibrate", "--synthetic", "--index", "idx", "--filter-top", "50"], "--filter-top"),
])
def test_calibrate_options_are_refused_before_anything_loads(argv, says, no_loading, capsys):
    assert _rc(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and says in err and "Traceback" not in err, err


def test_library_calibrations_refuse_a_bad_objective_before_searching(tmp_path):
    """calibrate_from_qrels and build_prior (library calls) check the objective first: an index
    whose search fails the test and a data folder that does not exist are never touched."""
    from nbce_rag import MarginThreshold
    from nbce_rag.filtering.prior import build_prior

    class NoSearch:
        def search(self, *a, **k):
            raise AssertionError("searched before the objective was checked")

        search_many = search

    with pytest.raises(CalibrationError, match="coverage"):
        MarginThreshold.calibrate_from_qrels(NoSearch(), {"q": "text"}, {"q": {"d": 1}}, objective="coverage90")
    with pytest.raises(CalibrationError, match="coverage"):
        build_prior(NoSearch(), tmp_path / "no-such-data", objective="coverage1.5")
    ok = {"objective": "f0.5"}
    from nbce_rag.filtering.objective import check_objective_option

    check_objective_option(ok)
    assert ok == {"objective": "f0.5"}  # canonical names pass unchanged


def test_synthetic_calibration_on_an_exhausted_index_says_add_documents(tmp_path, tiny_chat_tokenizer, capsys):
    """--n far above the index's chunks: 'raise --n' cannot help; the message says what can, and
    names no internal parameter."""
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(4):
        (docs / f"d{i}.txt").write_text(" ".join(f"topic{i} word{j}" for j in range(15)))
    from conftest import make_tiny_encoder

    make_tiny_encoder(tmp_path / "enc", seed=0)
    assert main(["index", str(docs), "--out", str(tmp_path / "idx"), "--encoder", str(tmp_path / "enc" / "model"),
                 "--no-progress"]) == 0
    save_tiny_llama(tmp_path / "model", tiny_chat_tokenizer, seed=1)
    capsys.readouterr()
    rc = main(["calibrate", "--synthetic", "--index", str(tmp_path / "idx"), "--n", "1000000",
               "--model", str(tmp_path / "model"), "--no-plot"])
    err = capsys.readouterr().err
    assert rc == 2, err
    line = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(line) == 1 and "add documents" in line[0], err
    assert "--n" not in line[0] and "min_positives" not in line[0] and "filter_top" not in line[0], err


# ------------------------------------------------------------------------------ the KV store and `cache`
KV_DOCS = [
    "The Eiffel Tower is in Paris and was completed in 1889.",
    "Bananas are rich in potassium and grow in tropical climates, mostly in large farms near the coast.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "Mount Everest is the highest mountain above sea level.",
]


@pytest.fixture(scope="module")
def kv_setup(tmp_path_factory, tiny_chat_tokenizer, encoder):
    """A saved tiny model and a saved index of KV_DOCS."""
    from nbce_rag import VectorIndex

    root = tmp_path_factory.mktemp("kv")
    save_tiny_llama(root / "model", tiny_chat_tokenizer, seed=3)
    VectorIndex.build(encoder, KV_DOCS).save(root / "idx")
    return root


def _fresh_index(kv_setup, tmp_path):
    import shutil

    shutil.copytree(kv_setup / "idx", tmp_path / "idx")
    return str(tmp_path / "idx"), str(kv_setup / "model")


def _shards(root):
    from pathlib import Path

    return sorted(p for p in Path(root).glob("*/*.safetensors") if not p.name.startswith("."))


def _temps(root):
    from pathlib import Path

    return sorted(p for p in Path(root).rglob(".tmp*"))


def _ask(idx, model, caplog):
    import logging

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        rc = main(["ask", "When was the tower completed?", "--index", idx, "--model", model, "--device", "cpu",
                   "-k", "2", "--no-filter", "--max-new-tokens", "3"])
    return rc, [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "KV cache" in r.getMessage()]


@pytest.mark.parametrize("out", ["file", "under-a-file"])
def test_cache_that_stores_nothing_fails(kv_setup, tmp_path, capsys, out):
    idx, model = _fresh_index(kv_setup, tmp_path)
    (tmp_path / "afile").write_text("not a folder")
    target = tmp_path / "afile" if out == "file" else tmp_path / "afile" / "kv"
    rc = main(["cache", "--index", idx, "--model", model, "--device", "cpu", "--out", str(target)])
    cap = capsys.readouterr()
    assert rc == 1, cap.err
    assert len(cap.err.strip().splitlines()) == 1 and str(target) in cap.err and "nothing was cached" in cap.err
    assert "MiB on disk" not in cap.out and (tmp_path / "afile").read_text() == "not a folder"


def test_cache_whose_shard_writes_fail_exits_1(kv_setup, tmp_path, capsys, monkeypatch):
    """A write that fails mid-run (a full disk) is not a success either."""
    import errno

    import safetensors.torch

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    idx, model = _fresh_index(kv_setup, tmp_path)
    rc = main(["cache", "--index", idx, "--model", model, "--device", "cpu"])
    cap = capsys.readouterr()
    assert rc == 1 and "No space left" in cap.err and "MiB on disk" not in cap.out, cap.err
    assert _temps(tmp_path / "idx" / "kvcache") == []  # the failed write left no temp file


def test_cache_honours_and_names_the_kv_cache_bytes_variable(kv_setup, tmp_path, capsys, monkeypatch):
    import nbce_rag.decoding.kvcache as kvc

    idx, model = _fresh_index(kv_setup, tmp_path)
    monkeypatch.setenv("NBCE_RAG_KV_CACHE_BYTES", "lots")
    assert main(["cache", "--index", idx, "--model", model, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "NBCE_RAG_KV_CACHE_BYTES" in err and "'lots'" in err, err
    budgets = []
    real = kvc.PassageKVCache.__init__

    def spy(self, max_bytes=None, *a, **k):
        budgets.append(max_bytes)
        real(self, max_bytes, *a, **k)

    monkeypatch.setattr(kvc.PassageKVCache, "__init__", spy)
    monkeypatch.setenv("NBCE_RAG_KV_CACHE_BYTES", "3MiB")
    assert main(["cache", "--index", idx, "--model", model, "--device", "cpu"]) == 0
    assert budgets[0] == 3 * 2**20  # the RAM level of the fill has the budget the user set
    monkeypatch.setenv("NBCE_RAG_KV_CACHE_BYTES", "-1")
    assert main(["ask", "q", "--index", idx, "--model", model, "--device", "cpu"]) == 2
    assert "NBCE_RAG_KV_CACHE_BYTES" in capsys.readouterr().err


KILLED_CACHE = r"""
import os, sys, time
import safetensors.torch as st
real = st.save_file
def stuck(tensors, path, metadata=None):
    real(tensors, path, metadata=metadata)  # the whole temp file is there, never renamed
    open(sys.argv[1], "w").close()            # tell the test: kill me now
    time.sleep(3600)
st.save_file = stuck
from nbce_rag.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_killed_cache_run_leaves_nothing_that_warns_forever(kv_setup, tmp_path, caplog):
    """A `cache` run killed with SIGKILL while writing a shard: the next `cache` removes its temp
    files, and no `ask` warns about them."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    idx, model = _fresh_index(kv_setup, tmp_path)
    marker = tmp_path / "writing"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_CACHE, str(marker), "cache", "--index", idx, "--model",
                             model, "--device", "cpu", "--batch", "2"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while not marker.exists():  # a barrier on the child's progress, not a time limit on the test
            if proc.poll() is not None:
                raise AssertionError(proc.stderr.read().decode())
            import time

            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    kv = tmp_path / "idx" / "kvcache"
    left = _temps(kv)
    assert left and any(p.name.endswith(".safetensors") for p in left)  # what the kill left behind
    legacy = left[0].parent / ".tmp-abc123xy.safetensors"  # a temp file of a writer before this version
    legacy.write_bytes(b"partial")
    os.utime(legacy, (0, 0))
    rc, warnings = _ask(idx, model, caplog)
    assert rc == 0 and warnings == [], warnings  # readers never look at temp files
    assert main(["cache", "--index", idx, "--model", model, "--device", "cpu"]) == 0
    assert _temps(kv) == [] and len(_shards(kv)) >= 1
    rc, warnings = _ask(idx, model, caplog)
    assert rc == 0 and warnings == [], warnings


def test_truncated_shard_is_replaced_when_the_cache_is_refilled(kv_setup, tmp_path, caplog, capsys):
    idx, model = _fresh_index(kv_setup, tmp_path)
    kv = tmp_path / "idx" / "kvcache"
    assert main(["cache", "--index", idx, "--model", model, "--device", "cpu", "--batch", "2"]) == 0
    first = _shards(kv)
    assert len(first) == 2
    data = first[0].read_bytes()
    first[0].write_bytes(data[: len(data) // 2])
    rc, warnings = _ask(idx, model, caplog)
    assert rc == 0 and any("unreadable" in w and "nbce-rag cache" in w for w in warnings)
    capsys.readouterr()
    assert main(["cache", "--index", idx, "--model", model, "--device", "cpu"]) == 0
    assert "2 chunk(s) cached, 2 already there" in capsys.readouterr().out  # the lost entries, recomputed
    assert not first[0].exists() and len(_shards(kv)) == 2  # the damaged file is gone
    rc, warnings = _ask(idx, model, caplog)
    assert rc == 0 and warnings == [], warnings


def test_shard_with_a_damaged_entry_is_rewritten_without_it(kv_setup, tmp_path, caplog):
    """A flipped byte in one entry (the header intact): the entry is recomputed into a new shard
    and the old shard keeps only its intact entries, so the warning does not come back."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    idx, model = _fresh_index(kv_setup, tmp_path)
    kv = tmp_path / "idx" / "kvcache"
    assert main(["cache", "--index", idx, "--model", model, "--device", "cpu"]) == 0
    (shard,) = _shards(kv)
    with safe_open(str(shard), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    n_entries = sum(1 for k in tensors if not k.endswith(".ids"))
    tensors["e1"] = tensors["e1"].clone()
    tensors["e1"].view(-1)[0] += 1.0  # damaged data, same shape: only the CRC can tell
    save_file(tensors, str(shard), metadata=meta)
    rc, warnings = _ask(idx, model, caplog)
    assert rc == 0
    assert main(["cache", "--index", idx, "--model", model, "--device", "cpu"]) == 0
    assert len(_shards(kv)) == 2
    with safe_open(str(shard), framework="pt") as f:
        assert "e1" not in f.keys() and sum(1 for k in f.keys() if not k.endswith(".ids")) == n_entries - 1
    rc, warnings = _ask(idx, model, caplog)
    assert rc == 0 and warnings == [], warnings


def test_the_crc_covers_the_token_ids_and_old_shards_stay_readable(tmp_path):
    import json
    import zlib

    import torch
    from safetensors.torch import save_file

    from nbce_rag.decoding.kvstore import FORMAT, DiskKVStore

    kv = torch.randn(2, 2, 1, 4, 8)
    store = DiskKVStore(tmp_path)
    path = store.write("ns", {}, [((1, 2, 3, 4), kv)])
    # the ids of the entry damaged on disk, its CRC as stored: it must not be served under other ids
    save_file({"e0": kv, "e0.ids": torch.tensor([1, 2, 3, 5])}, str(path), metadata=_meta(path))
    reader = DiskKVStore(tmp_path, writable=False)
    reader.refresh("ns")
    key, m = reader.find("ns", [1, 2, 3, 5], 4)
    assert m == 4 and reader.load("ns", key) is None and reader.errors == 1
    # a shard of the previous format (CRC of the tensor alone, no crc_scope) is still read
    old = tmp_path / "ns" / "kv-old.safetensors"
    save_file({"e0": kv, "e0.ids": torch.tensor([7, 8, 9, 10])}, str(old),
              metadata={"format": FORMAT, "namespace": "ns",
                        "crc": json.dumps({"e0": zlib.crc32(kv.contiguous().view(torch.uint8).numpy())})})
    reader = DiskKVStore(tmp_path, writable=False)
    reader.refresh("ns")
    key, m = reader.find("ns", [7, 8, 9, 10], 4)
    assert m == 4 and torch.equal(reader.load("ns", key), kv)


def _meta(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


# ------------------------------------------------------------------------------ text that is not valid Unicode
BAD_TEXT = "caf\udce9 au lait?"  # the byte 0xE9 of Latin-1 "café", as Python keeps it from argv
LONE = "half a pair \ud800 here"


def test_check_text_names_the_field_and_the_character():
    from nbce_rag.errors import InvalidTextError
    from nbce_rag.types import check_text

    assert check_text("café ✓", "q") == "café ✓"
    with pytest.raises(InvalidTextError, match=r"question is not valid text: an invalid UTF-8 byte 0xE9 at character 3") as e:
        check_text(BAD_TEXT, "question")
    assert e.value.field == "question" and isinstance(e.value, ValueError)
    with pytest.raises(InvalidTextError, match="lone surrogate U\\+D800"):
        check_text(LONE, "passages[1]")


def test_python_api_refuses_invalid_text_before_the_tokenizer(tiny_chat_decoder, encoder):
    from nbce_rag import RAGPipeline, VectorIndex
    from nbce_rag.errors import InvalidTextError

    dec = tiny_chat_decoder
    with pytest.raises(InvalidTextError, match="^question is not valid text"):
        dec.generate(LONE, ["fine"], max_new_tokens=2)
    with pytest.raises(InvalidTextError, match=r"^passages\[1\] is not valid text"):
        dec.generate("fine?", ["fine", BAD_TEXT], max_new_tokens=2)
    with pytest.raises(InvalidTextError, match=r"^passages\[0\] is not valid text"):
        dec.generate("fine?", [{"text": LONE}], max_new_tokens=2)
    with pytest.raises(InvalidTextError, match=r"^stop\[0\] is not valid text"):
        dec.generate("fine?", ["fine"], max_new_tokens=2, stop=[LONE])
    idx = VectorIndex.build(encoder, ["The tower is in Paris.", "Bananas are yellow."])
    with pytest.raises(InvalidTextError, match="^the query is not valid text"):
        idx.search(LONE)
    with pytest.raises(InvalidTextError, match=r"^documents\[0\] is not valid text"):
        idx.add([BAD_TEXT])
    rag = RAGPipeline(dec, idx)
    for call in (rag.ask, lambda q: list(rag.stream(q)), rag.start):
        with pytest.raises(InvalidTextError, match="^question is not valid text"):
            call(LONE)


def test_cli_refuses_invalid_text_with_one_line_exit_2(no_loading, capsys, monkeypatch, tmp_path):
    for argv, says in ((["generate", BAD_TEXT], "the question is not valid text: an invalid UTF-8 byte 0xE9"),
                       (["ask", LONE, "--index", "idx"], "the question is not valid text: a lone surrogate"),
                       (["generate", "ok?", "-p", "fine", "-p", BAD_TEXT], "--passage 2 is not valid text"),
                       (["generate", "ok?", "--stop", BAD_TEXT], "--stop is not valid text"),
                       (["search", BAD_TEXT, "--index", "idx"], "is not valid text")):
        assert _rc(argv) == 2, argv
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and says in err and "TextEncodeInput" not in err, (argv, err)


def test_cli_passage_file_that_is_not_utf8_is_refused_never_replaced(no_loading, capsys, tmp_path):
    (tmp_path / "ok.txt").write_bytes("\ufeffThe caf\u00e9 opened in 1910.".encode("utf-8"))
    (tmp_path / "latin1.txt").write_bytes("The caf\u00e9 opened in 1910.".encode("latin-1"))
    from nbce_rag.commands.generate import _read_passages

    assert _read_passages(["@" + str(tmp_path / "ok.txt")]) == ["The caf\u00e9 opened in 1910."]  # BOM dropped
    assert _rc(["generate", "When?", "-p", "fine", "-p", "@" + str(tmp_path / "latin1.txt")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "--passage 2" in err and "not valid UTF-8: byte 0xE9 at offset 7" in err and "iconv" in err


def test_cli_invalid_utf8_argument_in_a_real_process():
    import subprocess
    import sys
    from pathlib import Path

    r = subprocess.run([sys.executable, "-m", "nbce_rag.cli", "generate", b"caf\xe9?", "--device", "tpu9"],
                       capture_output=True, cwd=Path(__file__).resolve().parents[1])
    err = r.stderr.decode("utf-8", "replace")
    assert r.returncode == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "the question is not valid text: an invalid UTF-8 byte 0xE9" in err


def test_chat_loop_reports_a_line_that_is_not_utf8_and_goes_on(kv_setup, tmp_path, capsys, monkeypatch):
    import io
    import sys

    idx, model = _fresh_index(kv_setup, tmp_path)
    raw = io.TextIOWrapper(io.BytesIO(b"caf\xe9?\nWhen was the tower completed?\n"), encoding="utf-8")
    monkeypatch.setattr(sys, "stdin", raw)
    rc = main(["chat", "--index", idx, "--model", model, "--device", "cpu", "--no-filter", "--max-new-tokens", "2"])
    cap = capsys.readouterr()
    assert "error: question is not valid text: an invalid UTF-8 byte 0xE9" in cap.err
    assert cap.out.count("Supported:") == 1  # the next question was answered
    assert rc == 2  # bad input, as `ask` reports it


# ------------------------------------------------------------------------------ pooling specs
@pytest.mark.parametrize("spec, says", [("posterior:static,online", "twice"), ("posterior:", "names no option"),
                                        ("posterior:product,product", "twice"), ("posterior:scores,question", "twice"),
                                        ("posterior:product,,static", "empty"), ("posterior:fast", "unknown")])
def test_contradictory_or_empty_posterior_specs_are_errors(spec, says, no_loading, capsys):
    from nbce_rag.config import NBCEConfig
    from nbce_rag.errors import ConfigError

    with pytest.raises(ConfigError, match=says):
        NBCEConfig(pooling=spec).validate()
    assert _rc(["generate", "q", "--pooling", spec]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and says in err and "Pooling" not in err


@pytest.mark.parametrize("spec", ["posterior", "posterior:question", "posterior:static", "posterior:uniform,online"])
def test_valid_posterior_specs(spec):
    from nbce_rag.decoding.nbce import get_pooling

    p = get_pooling(spec)
    assert get_pooling(p.spec).spec == p.spec


# ------------------------------------------------------------------------------ the server
@pytest.fixture(scope="module")
def client(tiny_chat_decoder):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from nbce_rag import RAGPipeline
    from nbce_rag.integrations.server import create_app

    app = create_app(RAGPipeline(tiny_chat_decoder), encoder=False, model_name="m")
    with TestClient(app) as c:
        yield c


def _post(client, path, raw: bytes):
    return client.post(path, content=raw, headers={"content-type": "application/json"})


def _failed(client):
    return client.get("/health").json()["stats"]["failed"]


@pytest.mark.parametrize("path, raw, param", [
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "caf\\ud800?"}]}', "messages[0].content"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "caf\xe9?"}]}', "messages[0].content"),
    ("/v1/chat/completions", b'{"messages": [{"role": "system", "content": "\\udfff"}, {"role": "user", "content": "q?"}]}',
     "messages[0].content"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}]}',
     "messages[0].content[0].text"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "q?"}], "documents": ["ok", "bad \\ud800"]}',
     "documents[1]"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "q?"}], "documents": [{"text": "bad \xff"}]}',
     "documents[0].text"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "q?"}], "documents": [{"text": "ok", "title": "\\ud800"}]}',
     "documents[0].title"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "q?"}], "stop": ["\\ud800"]}', "stop[0]"),
    ("/v1/completions", b'{"prompt": "caf\\udc00?"}', "prompt"),
])
def test_server_refuses_invalid_text_with_400_invalid_text(client, path, raw, param):
    before = _failed(client)
    r = _post(client, path, raw)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_text" and err["param"] == param, err
    assert "not valid text" in err["message"] and "TextEncodeInput" not in err["message"]
    assert _failed(client) == before  # refused at the door, not a failure of the server


def test_server_pooling_errors_speak_json(client):
    for spec, says in (("nope", "unknown pooling"), ("posterior:static,online", "twice"), ("posterior:", "no option")):
        r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "q?"}],
                                                      "nbce": {"pooling": spec}})
        err = r.json()["error"]
        assert r.status_code == 400 and err["param"] == "nbce.pooling" and says in err["message"], err
        assert "Pooling" not in err["message"]  # no Python class to pass over HTTP


# ------------------------------------------------------------------------------ exact usage
DOC = ["The Eiffel Tower is in Paris and was completed in 1889."]


def _stop_inside(text: str) -> str:
    """A stop string that first occurs inside the last token's text (not earlier)."""
    return next(text[i:] for i in range(len(text) - 1, -1, -1) if text[i:].strip() and text.find(text[i:]) == i)


def test_completion_tokens_count_exactly_the_tokens_generated(tiny_chat_decoder, monkeypatch):
    dec = tiny_chat_decoder
    free = dec.generate("When?", DOC, max_new_tokens=6)
    assert free.finish_reason == "length" and free.completion_tokens == len(free.token_ids) == 6
    for n in (1, 3):  # a stop string inside the n-th token: n tokens generated, never n + 1
        text_n = dec.tokenizer.decode(free.token_ids[:n], skip_special_tokens=True)
        stop = _stop_inside(text_n)
        got = dec.generate("When?", DOC, max_new_tokens=n, stop=[stop])
        assert got.finish_reason == "stop", (stop, got.text)
        assert got.completion_tokens == len(got.token_ids) == n <= n
        assert got.usage()["completion_tokens"] == n
    # an end-of-sequence token is a generated token too (not in token_ids): counted once
    monkeypatch.setattr(dec, "_eos_ids", set(dec._eos_ids) | {free.token_ids[2]})
    got = dec.generate("When?", DOC, max_new_tokens=6)
    assert got.finish_reason == "stop" and got.token_ids == free.token_ids[:2] and got.completion_tokens == 3


def test_server_usage_never_exceeds_max_tokens(client, tiny_chat_decoder):
    free = tiny_chat_decoder.generate("When?", DOC, max_new_tokens=1)
    stop = _stop_inside(free.text)
    r = client.post("/v1/completions", json={"prompt": "When?", "documents": DOC, "max_tokens": 1, "stop": [stop]})
    body = r.json()
    assert r.status_code == 200 and body["choices"][0]["finish_reason"] == "stop", body
    assert body["usage"]["completion_tokens"] == 1


# ------------------------------------------------------------------------------ messages
def test_calibration_warnings_are_one_line_without_a_source_path(encoder, tmp_path, capsys):
    import json

    from nbce_rag import VectorIndex

    n = 12
    docs = [f"Document {i} is about topic{i} and the colour of item{i}." for i in range(n)]
    VectorIndex.build(encoder, [{"id": f"d{i}", "text": t} for i, t in enumerate(docs)]).save(tmp_path / "idx")
    (tmp_path / "q.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": f"what about topic{i}?"}) + "\n"
                                              for i in range(n)))
    (tmp_path / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in range(n)))
    rc = main(["calibrate", "--index", str(tmp_path / "idx"), "--queries", str(tmp_path / "q.jsonl"),
               "--qrels", str(tmp_path / "qrels.tsv"), "-k", str(n), "--bootstrap", "10", "--no-plot",
               "--out", str(tmp_path / "cal.json")])
    err = capsys.readouterr().err
    assert rc == 0, err
    lines = [ln for ln in err.splitlines() if "warning" in ln.lower()]
    assert any(ln.startswith("nbce-rag calibrate: warning: only 12 queries to bootstrap") for ln in lines), err
    assert not any(".py:" in ln or "warnings.warn" in ln or "CalibrationWarning" in ln for ln in err.splitlines()), err


def test_a_question_too_long_for_the_window_says_so(tiny_chat_decoder):
    from nbce_rag.errors import PromptTooLongError

    window = tiny_chat_decoder.context_window
    with pytest.raises(PromptTooLongError) as e:
        tiny_chat_decoder.generate("why " * (2 * window), ["a passage"], max_new_tokens=4)
    msg = str(e.value)
    assert "the question is too long for the model's window" in msg and "max_new_tokens" not in msg
    with pytest.raises(PromptTooLongError, match="Lower max_new_tokens to at most"):  # here it would help
        tiny_chat_decoder.generate("why?", ["a passage"], max_new_tokens=window - 5)
