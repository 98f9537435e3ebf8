"""Every script in examples/ runs on the bundled defaults and answers (each in a fresh Python)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
BUDGET_S = 60  # what an example should take on a 2-core machine (the first LLM conversion aside)


@pytest.fixture(scope="module")
def warm_cache(bundled_decoder):
    """Convert the bundled GGUF once (cached on disk) so no example pays for it."""
    return bundled_decoder


def _run(name: str, *args: str) -> tuple:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    # on a shared, busy machine one intra-op thread is several times faster than spinning two
    env.setdefault("OMP_NUM_THREADS", "1")
    # the child imports the nbce_rag this test imported, whether it is installed (venv, CI) or
    # found from the working directory of a plain `python -m pytest`
    import nbce_rag

    here = str(Path(nbce_rag.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH", "")) if p)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True,
                          timeout=300, env=env, cwd=str(EXAMPLES.parent))
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0, f"{name} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}"
    if elapsed > BUDGET_S:
        warnings.warn(f"{name} took {elapsed:.0f} s (budget {BUDGET_S} s; is the machine busy?)")
    return proc.stdout, elapsed


@pytest.mark.slow
def test_examples_are_all_tested():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == [
        "langchain_example.py", "llamaindex_example.py", "pipeline_example.py"]


@pytest.mark.slow
def test_pipeline_example(warm_cache):
    out, _ = _run("pipeline_example.py")
    assert "Q: What does the pass statement do?" in out
    assert "passed the filter" in out and "dropped" in out
    assert "Sources:" in out and "[1] pass#0" in out
    answer = out.split("A: ", 1)[1].split("\n", 1)[0]
    assert "pass" in answer.lower()


@pytest.mark.slow
def test_langchain_example(warm_cache):
    pytest.importorskip("langchain_core")
    out, _ = _run("langchain_example.py")
    assert "Passages that passed the filter:" in out and "[1] pass" in out
    answer = out.split("A: ", 1)[1].split("\n", 1)[0]
    assert "pass" in answer.lower()


@pytest.mark.slow
def test_llamaindex_example(warm_cache):
    pytest.importorskip("llama_index.core")
    out, _ = _run("llamaindex_example.py")
    assert "Sources:" in out and "[1] pass" in out and "of the answer's tokens" in out
    answer = out.split("A: ", 1)[1].split("\n", 1)[0]
    assert "pass" in answer.lower()
