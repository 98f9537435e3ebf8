"""Several writers on one index directory: the writer lock, merging a stale copy's changes,
conflicts, killed saves and their leftovers. Writers are real processes where it matters.

The indexes here are built from random vectors (``add_vectors``), so no encoder (and no torch)
is loaded and a writer process starts in well under a second."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import nbce_rag.retrieval.index as index_mod
import nbce_rag.retrieval.index_store as index_store
from nbce_rag.errors import ConflictError, LockTimeoutError
from nbce_rag.retrieval.index import LOCK_FILE, VectorIndex

ROOT = Path(__file__).resolve().parents[1]
DIM = 16


def _rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)


def _new_index(path: Path, n: int = 2000) -> VectorIndex:
    idx = VectorIndex(DIM, "random@sha256:0123456789abcdef")
    idx.add_vectors(_rows(n, 0), [f"text {i}" for i in range(n)], [f"base-{i}" for i in range(n)])
    idx.save(path)
    return idx


def _files(path: Path) -> list:
    return sorted(p.name for p in path.iterdir())


def _assert_clean(path: Path) -> None:
    """Only the lock, the manifest and the two data files it names."""
    m = json.loads((path / "manifest.json").read_text())
    want = sorted([LOCK_FILE, "manifest.json", m["files"]["vectors"]["name"], m["files"]["records"]["name"]])
    assert _files(path) == want


# ------------------------------------------------------------------ concurrent writer processes

_WRITER = textwrap.dedent(
    """
    import sys, numpy as np
    from nbce_rag.retrieval.index import VectorIndex
    path, name, iters, lockstep = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"

    def barrier(what):  # tell the parent, wait for its go (a barrier over every writer process)
        print(what, flush=True)
        assert sys.stdin.readline() == "go\\n"

    barrier("ready")
    for i in range(iters):
        rid = f"{name}-{i}"
        try:
            if lockstep:
                barrier("round")  # every save of the round before is done
            idx = VectorIndex.load(path)
            n_loaded = len(idx)
            v = np.random.default_rng(abs(hash(rid)) % 2**32).standard_normal((1, idx.dim)).astype(np.float32)
            idx.add_vectors(v, [rid], [rid])
            if lockstep:
                barrier("loaded")  # every writer holds its copy before any of them saves
            idx.save(path)
        except Exception as e:
            print("FAIL", rid, type(e).__name__, e, flush=True)
        else:
            # a save over a copy someone else saved after our load merges their rows into ours
            print("OK", rid, "merged" if len(idx) > n_loaded + 1 else "first", flush=True)
    """
)


def _run_writers(path: Path, n_writers: int, iters: int, *, lockstep: bool) -> tuple:
    """Run ``n_writers`` writer processes, released together by a barrier once all have started.
    With ``lockstep`` they also meet before every load and before every save, so every save but
    the first of each round runs over a stale copy (real overlap, whatever the machine's load)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen([sys.executable, "-c", _WRITER, str(path), f"w{w}", str(iters), "1" if lockstep else "0"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                         env=env, cwd=path.parent)
        for w in range(n_writers)
    ]
    lines: list = []
    try:
        def meet(what):
            for p in procs:
                line = p.stdout.readline()
                while line.startswith(("OK ", "FAIL ")):  # a result of the round before
                    lines.append(line.strip())
                    line = p.stdout.readline()
                assert line == what + "\n", f"a writer did not reach {what!r}: {line!r} (exit {p.poll()})"
            for p in procs:
                p.stdin.write("go\n")
                p.stdin.flush()

        meet("ready")
        for _ in range(iters if lockstep else 0):
            meet("round")
            meet("loaded")
        for p in procs:
            out, _ = p.communicate(timeout=120)
            assert p.returncode == 0, f"a writer process failed (exit {p.returncode})"
            lines += [ln for ln in out.splitlines() if ln]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    ok = [ln for ln in lines if ln.startswith("OK ")]
    failed = [ln for ln in lines if not ln.startswith("OK ")]
    return ok, failed


@pytest.mark.parametrize("n_writers", [2, 4])
def test_concurrent_writer_processes_keep_every_reported_row(tmp_path, n_writers):
    iters = 4
    for round_, lockstep in enumerate((True, False, False)):
        path = tmp_path / f"idx{round_}"
        _new_index(path)
        ok, failed = _run_writers(path, n_writers, iters=iters, lockstep=lockstep)
        loaded = VectorIndex.load(path)  # always loads
        ids = set(loaded.ids)
        reported = {line.split()[1] for line in ok}
        assert reported <= ids, f"lost rows of writers that reported success: {sorted(reported - ids)}"
        assert {f"base-{i}" for i in range(2000)} <= ids
        # saves merge instead of failing: every writer's every row made it
        assert not failed, failed
        assert len(ids) == 2000 + n_writers * iters
        _assert_clean(path)
        if lockstep:  # the writers did overlap: in each round all but the first save merged a stale copy
            assert sum(line.endswith(" merged") for line in ok) == iters * (n_writers - 1), ok


@pytest.mark.slow  # two CLI processes load torch and the encoder: over a minute on a busy 2-core box
def test_concurrent_cli_appends_both_land(tmp_path):
    """Two `nbce-rag index --append` processes at once (the issue's report): both rows are kept."""
    from conftest import make_tiny_encoder

    make_tiny_encoder(tmp_path / "enc", seed=0)
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("Dogs bark at night.")
    for name in ("x", "y"):
        (tmp_path / f"{name}.txt").write_text(f"Document {name} about volcanoes and glaciers.")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    cli = [sys.executable, "-m", "nbce_rag.cli", "index"]
    subprocess.run(cli + [str(docs), "--out", str(tmp_path / "idx"), "--encoder", str(tmp_path / "enc" / "model")],
                   check=True, env=env, capture_output=True)
    procs = [subprocess.Popen(cli + [str(tmp_path / f"{n}.txt"), "--out", str(tmp_path / "idx"), "--append"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for n in ("x", "y")]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    assert sorted(VectorIndex.load(tmp_path / "idx").ids) == ["a.txt#0", "x.txt#0", "y.txt#0"]
    _assert_clean(tmp_path / "idx")


# ------------------------------------------------------------------ stale copies: merge or conflict


def test_stale_copy_merges_on_save(tmp_path):
    p = tmp_path / "idx"
    _new_index(p, n=10)
    a, b = VectorIndex.load(p), VectorIndex.load(p)
    a.add_vectors(_rows(1, 1), ["from a"], ["a1"])
    a.delete("base-0")
    a.save(p)
    b.add_vectors(_rows(2, 2), ["from b", "from b too"], ["b1", "b2"])
    b.delete(["base-1", "b2"])  # b's own row, deleted again: replayed in order
    b.save(p)  # b was loaded before a saved: merged, not overwritten
    want = {f"base-{i}" for i in range(2, 10)} | {"a1", "b1"}
    assert set(VectorIndex.load(p).ids) == want
    assert set(b.ids) == want  # the copy now holds the merged rows
    np.testing.assert_array_equal(VectorIndex.load(p).vectors[VectorIndex.load(p).ids.index("a1")],
                                  a.vectors[a.ids.index("a1")])
    _assert_clean(p)
    # a is stale now too; saving it again merges b's changes rather than dropping them
    a.add_vectors(_rows(1, 3), ["a again"], ["a2"])
    a.save(p)
    assert set(VectorIndex.load(p).ids) == want | {"a2"}


def test_same_row_added_by_two_copies_is_a_conflict_and_writes_nothing(tmp_path):
    p = tmp_path / "idx"
    _new_index(p, n=5)
    a, b = VectorIndex.load(p), VectorIndex.load(p)
    a.add_vectors(_rows(1, 1), ["a's version"], ["same"])
    a.save(p)
    before = {f: (p / f).read_bytes() for f in _files(p)}
    b.add_vectors(_rows(1, 2), ["b's version"], ["same"])
    with pytest.raises(ConflictError, match="same"):
        b.save(p)
    assert {f: (p / f).read_bytes() for f in _files(p)} == before
    assert VectorIndex.load(p).get("same").text == "a's version"
    assert b.get("same").text == "b's version"  # b is left as it was


def test_on_duplicate_policy_decides_concurrent_adds_of_one_document(tmp_path):
    from conftest import make_tiny_encoder

    enc = make_tiny_encoder(tmp_path / "enc", seed=0)
    p = tmp_path / "idx"
    VectorIndex.build(enc, [{"text": "Dogs bark.", "id": "dogs"}]).save(p)
    doc_a = {"text": "Version A. " * 3, "id": "doc"}
    doc_b = {"text": "Version B, with another text.", "id": "doc"}
    for policy, winner in (("replace", "B"), ("skip", "A")):
        a, b = VectorIndex.load(p, enc), VectorIndex.load(p, enc)
        a.delete("doc")
        a.save(p)
        a.add([doc_a])
        a.save(p)
        b.add([doc_b], on_duplicate=policy)
        b.save(p)
        texts = [h.text for h in VectorIndex.load(p, enc).search("version", k=10) if h.metadata["doc_id"] == "doc"]
        assert texts and all(f"Version {winner}" in t for t in texts), (policy, texts)
    a, b = VectorIndex.load(p, enc), VectorIndex.load(p, enc)
    a.add([{"text": "New one.", "id": "new"}])
    a.save(p)
    b.add([{"text": "Also new.", "id": "new"}])  # on_duplicate="error"
    with pytest.raises(ConflictError):
        b.save(p)


def test_rebuilt_index_is_a_conflict(tmp_path):
    p = tmp_path / "idx"
    _new_index(p, n=5)
    stale = VectorIndex.load(p)
    other = VectorIndex(DIM + 1, "other@sha256:fedcba9876543210")
    other.add_vectors(np.ones((1, DIM + 1), np.float32), ["x"], ["x"])
    other.save(p)  # never loaded from p: replaces it (a rebuild)
    stale.add_vectors(_rows(1, 1), ["y"], ["y"])
    with pytest.raises(ConflictError, match="rebuilt"):
        stale.save(p)
    assert VectorIndex.load(p).ids == ["x"]


def test_saving_a_copy_elsewhere_replaces_what_is_there(tmp_path):
    _new_index(tmp_path / "a", n=3)
    _new_index(tmp_path / "b", n=7)
    VectorIndex.load(tmp_path / "a").save(tmp_path / "b")
    assert len(VectorIndex.load(tmp_path / "b")) == 3
    _assert_clean(tmp_path / "b")


# ------------------------------------------------------------------ the lock


def test_lock_timeout_is_a_clear_error(tmp_path, monkeypatch):
    import nbce_rag.files as io_mod

    p = tmp_path / "idx"
    idx = _new_index(p, n=3)
    tries = []
    real_try = io_mod._try_lock
    monkeypatch.setattr(io_mod, "_try_lock", lambda fd: tries.append(real_try(fd)) or tries[-1])
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
         "fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)", str(p / LOCK_FILE)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        t0 = time.monotonic()
        with pytest.raises(LockTimeoutError, match=r"locked by another writer.*0.3 s"):
            idx.save(p, lock_timeout=0.3)
        # it waited for the other writer (tried again and again, never got it) before giving up;
        # a lower bound only: the deadline is read from the same clock, so load cannot break it
        assert time.monotonic() - t0 >= 0.3
        assert len(tries) > 1 and not any(tries)
    finally:
        holder.kill()  # the kernel releases a dead holder's lock
        holder.wait()
    idx.save(p, lock_timeout=5)


def test_threads_of_one_process_are_serialised_and_edit_holds_the_lock(tmp_path, monkeypatch):
    import nbce_rag.files as io_mod

    p = tmp_path / "idx"
    _new_index(p, n=3)
    order = []
    blocked = threading.Event()  # the other thread tried the lock and found it held
    real_try = io_mod._try_lock

    def watched_try(fd):
        got = real_try(fd)
        if not got and threading.current_thread().name == "other-writer":
            blocked.set()
        return got

    monkeypatch.setattr(io_mod, "_try_lock", watched_try)

    def other_writer():
        order.append("other starts")
        VectorIndex.load(p).save(p, lock_timeout=60)  # waits for the edit below
        order.append("other saved")

    with VectorIndex.edit(p) as idx:
        t = threading.Thread(target=other_writer, name="other-writer")
        t.start()
        assert blocked.wait(60), "the other writer never met the edit's lock"
        idx.add_vectors(_rows(1, 1), ["edited"], ["e1"])
        order.append("edit done")
    t.join(60)
    assert not t.is_alive()
    assert order == ["other starts", "edit done", "other saved"]
    assert "e1" in VectorIndex.load(p).ids  # the other writer's copy was loaded before: merged
    with pytest.raises(RuntimeError):
        with VectorIndex.edit(p) as idx:
            idx.add_vectors(_rows(1, 2), ["never"], ["never"])
            raise RuntimeError("the block failed")
    assert "never" not in VectorIndex.load(p).ids


# ------------------------------------------------------------------ killed saves leave no leftovers

_KILLED_SAVE = textwrap.dedent(
    """
    import os, signal, sys, numpy as np
    import nbce_rag.retrieval.index as m
    import nbce_rag.retrieval.index_store as store
    path, where = sys.argv[1], sys.argv[2]
    idx = m.VectorIndex.load(path)
    idx.add_vectors(np.ones((1, idx.dim), np.float32), ["x"], ["killed-row"])
    real = store._write_data_file
    def die(p, write):
        if where == "vectors-temp" and p.name.startswith("vectors"):
            def half(tmp):
                open(tmp, "wb").write(b"partial")
                os.kill(os.getpid(), signal.SIGKILL)
            return real(p, half)
        return real(p, write)
    def die_at_commit(p, manifest):
        if where == "manifest-temp":
            def half(tmp):
                open(tmp, "w").write("{")
                os.kill(os.getpid(), signal.SIGKILL)
            return store.atomic_write(p, half)
        os.kill(os.getpid(), signal.SIGKILL)  # data files renamed, manifest not yet replaced
    store._write_data_file = die
    store._commit_manifest = die_at_commit
    idx.save(path)
    """
)


def test_sigkill_mid_save_then_a_clean_save_leaves_no_leftovers(tmp_path):
    p = tmp_path / "idx"
    idx = _new_index(p, n=50)
    for where in ("vectors-temp", "manifest-temp", "data-files"):
        r = subprocess.run([sys.executable, "-c", _KILLED_SAVE, str(p), where], capture_output=True, text=True,
                           env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=60)
        assert r.returncode == -signal.SIGKILL, r.stderr
    left = [f for f in _files(p) if f.endswith(".tmp") or index_store._DATA_FILE.match(f) and f not in _files_named(p)]
    assert len([f for f in left if f.endswith(".tmp")]) == 2 and len(left) == 6, _files(p)  # the kills left debris
    assert VectorIndex.load(p).ids == idx.ids  # the old index is intact
    VectorIndex.load(p).save(p)
    _assert_clean(p)


def _files_named(p: Path) -> set:
    m = json.loads((p / "manifest.json").read_text())
    return {m["files"]["vectors"]["name"], m["files"]["records"]["name"]}


def test_random_sigkills_during_saves(tmp_path):
    """A writer saving in a loop is killed at random moments: the index always loads, holds
    every row the writer reported saved (and at most the one it was saving), and the next
    clean save removes whatever the kills left."""
    p = tmp_path / "idx"
    _new_index(p, n=20000)
    loop = textwrap.dedent(
        """
        import sys, numpy as np
        from nbce_rag.retrieval.index import VectorIndex
        path, name = sys.argv[1], sys.argv[2]
        idx = VectorIndex.load(path)
        for i in range(10**6):
            idx.add_vectors(np.ones((1, idx.dim), np.float32), ["x"], [f"{name}-r{i}"])
            idx.save(path)
            print(f"{name}-r{i}", flush=True)
        """
    )
    rng = np.random.default_rng(0)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    for k in range(6):
        name = f"p{k}"  # ids of its own: each writer really adds and saves rows
        proc = subprocess.Popen([sys.executable, "-c", loop, str(p), name], env=env, stdout=subprocess.PIPE, text=True)
        try:
            # the kill lands while the writer is in its loop: after a random number of saves
            reported = [proc.stdout.readline().strip() for _ in range(int(rng.integers(1, 12)))]
            assert reported[-1] == f"{name}-r{len(reported) - 1}", "the writer died before it was killed"
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        assert proc.returncode == -signal.SIGKILL
        reported += proc.stdout.read().split()  # saved before the kill, not read yet
        proc.stdout.close()
        ids = VectorIndex.load(p).ids
        mine = [i for i in ids if i.startswith(name + "-")]
        n = len(reported)
        assert mine[:n] == reported, "a row the writer reported saved is missing"
        assert mine in (reported, reported + [f"{name}-r{n}"])  # at most the save the kill interrupted
        assert len(ids) == 20000 + sum(len([i for i in ids if i.startswith(f"p{j}-")]) for j in range(k + 1))
    VectorIndex.load(p).save(p)
    _assert_clean(p)


def test_leftover_cleanup_never_touches_other_files(tmp_path):
    p = tmp_path / "idx"
    idx = _new_index(p, n=3)
    (p / "calibration.json").write_text("{}")
    (p / ".calibration.json.abc123.tmp").write_text("{")  # another file's temp: not ours to remove
    (p / "notes.txt").write_text("mine")
    (p / ".vectors-1a-2b.npy.x_y9.tmp").write_text("debris")
    (p / "records-1a-2b.jsonl").write_text("debris")
    idx.save(p)
    assert {"calibration.json", ".calibration.json.abc123.tmp", "notes.txt"} <= set(_files(p))
    assert ".vectors-1a-2b.npy.x_y9.tmp" not in _files(p) and "records-1a-2b.jsonl" not in _files(p)


def test_journal_is_not_kept_for_a_copy_never_saved(tmp_path):
    idx = VectorIndex(DIM, "random@sha256:0123456789abcdef")
    idx.add_vectors(_rows(100, 0), ["t"] * 100, [str(i) for i in range(100)])
    assert idx._journal == []
    idx.save(tmp_path / "idx")
    idx.delete("3")
    assert len(idx._journal) == 1
    idx.save(tmp_path / "idx")
    assert idx._journal == []
    assert index_mod.DEFAULT_LOCK_TIMEOUT > 0


def test_a_file_system_without_locks_still_saves_with_a_warning(tmp_path, monkeypatch, caplog):
    import errno

    import nbce_rag.files as io_mod

    def no_locks(fd):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(io_mod, "_try_lock", no_locks)
    with caplog.at_level("WARNING", logger="nbce_rag"):
        _new_index(tmp_path / "idx", n=3)
    assert len(VectorIndex.load(tmp_path / "idx")) == 3
    assert any("no file locks" in r.getMessage() for r in caplog.records)
