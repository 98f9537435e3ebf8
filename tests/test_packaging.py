"""`integrations/` sits at the top of the repository but installs as `nbce_rag.integrations`:
prove the mapping for a wheel install and for an editable install, each in a fresh place."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ADAPTERS = ["__init__.py", "langchain.py", "llama_index.py", "server/__init__.py", "server/protocol.py", "server/worker.py", "server/app.py"]


def _run(cmd, **kw):
    res = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert res.returncode == 0, f"{cmd} failed:\n{res.stdout}\n{res.stderr}"
    return res.stdout


def _where(python, cwd, env=None):
    code = ("import nbce_rag, nbce_rag.integrations as i, nbce_rag.commands as c; "
            "print(i.__file__); print(nbce_rag.__file__)")
    return _run([python, "-c", code], cwd=cwd, env=env).split()


@pytest.mark.slow
def test_wheel_install_maps_integrations(tmp_path):
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"), str(REPO)])
    wheel = next((tmp_path / "dist").glob("nbce_rag-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in ADAPTERS:
        if (REPO / "integrations" / f).exists():
            assert f"nbce_rag/integrations/{f}" in names
    assert "nbce_rag/decoder.py" in names
    assert not any(n.startswith("integrations/") for n in names), "adapters must not install as a top-level package"
    site = tmp_path / "site"
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)])
    integ, pkg = _where(sys.executable, cwd=tmp_path, env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"})
    assert Path(integ) == site / "nbce_rag" / "integrations" / "__init__.py"
    assert Path(pkg) == site / "nbce_rag" / "__init__.py"


@pytest.mark.slow
def test_editable_install_maps_integrations(tmp_path):
    venv = tmp_path / "venv"
    # no pip of its own: the venv uses this interpreter's pip and setuptools (system site)
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)])
    py = str(venv / "bin" / "python")
    _run([py, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-q", "-e", str(REPO)])
    integ, pkg = _where(py, cwd=tmp_path)
    assert Path(integ) == REPO / "integrations" / "__init__.py"
    assert Path(pkg) == REPO / "nbce_rag" / "__init__.py"


def test_core_never_imports_an_integration():
    """DESIGN contract: the core (nbce_rag/) never imports a framework adapter at module level."""
    for f in (REPO / "nbce_rag").rglob("*.py"):
        for line in f.read_text(encoding="utf-8").splitlines():
            if line.startswith(("import ", "from ")):
                assert "integrations" not in line, f"{f.name}: {line}"
                assert not line.split()[1].startswith(("langchain", "llama_index", "fastapi")), f"{f.name}: {line}"


def test_cli_help_on_every_subcommand():
    from nbce_rag.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert "generate" in sub.choices
    for name, p in sub.choices.items():
        assert p.format_help().startswith("usage: nbce-rag " + name)
    out = _run(["nbce-rag", "generate", "--help"])
    assert "--passage" in out and "--question" in out


def test_cli_printers_write_to_the_current_stdout(monkeypatch):
    """The printers must look sys.stdout up when called, not when imported (pytest, notebooks
    and servers replace it after import)."""
    import io

    from nbce_rag.commands.ask import print_sources
    from nbce_rag.commands.generate import print_answer
    from nbce_rag.types import Answer, SourceInfo

    ans = Answer(text="It was 1889.", token_ids=[1, 2], token_sources=[0, 0],
                 sources=[SourceInfo(index=0, text="The tower was completed in 1889.", score=0.8, n_tokens=2, share=1.0)])
    for printer in (print_answer, print_sources):
        buf = io.StringIO()
        monkeypatch.setattr(sys, "stdout", buf)
        printer(ans)
        assert "1889" in buf.getvalue()
