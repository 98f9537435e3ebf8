"""`integrations/` sits at the top of the repository but installs as `nbce_rag.integrations`:
prove the mapping for a wheel install and for an editable install, each in a fresh place."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


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
    sources = [f"nbce_rag/integrations/{p.relative_to(REPO / 'integrations').as_posix()}"
               for p in (REPO / "integrations").rglob("*.py") if "__pycache__" not in p.parts]
    sources += [p.relative_to(REPO).as_posix() for p in (REPO / "nbce_rag").rglob("*.py")
                if "__pycache__" not in p.parts and "integrations" not in p.relative_to(REPO).parts]
    assert len(sources) > 50 and "nbce_rag/decoding/decoder.py" in sources
    sources += [p.relative_to(REPO).as_posix() for p in (REPO / "nbce_rag" / "filtering" / "priors").glob("*.json")]
    missing = [s for s in sources if s not in names]
    assert not missing, f"the wheel lacks {missing}: list the package in pyproject.toml's packages"
    assert not any(n.startswith("integrations/") for n in names), "adapters must not install as a top-level package"
    site = tmp_path / "site"
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)])
    integ, pkg = _where(sys.executable, cwd=tmp_path, env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"})
    assert Path(integ) == site / "nbce_rag" / "integrations" / "__init__.py"
    assert Path(pkg) == site / "nbce_rag" / "__init__.py"


def _site_dirs() -> list:
    """The directories the running interpreter imports installed packages from, whether it is
    a venv (with or without --system-site-packages), a plain interpreter or CI's."""
    import site

    dirs = list(site.getsitepackages())
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    return [d for d in dict.fromkeys(dirs) if Path(d).is_dir()]


def _clean_env() -> dict:
    """This environment without PYTHONPATH, so a child imports only what its own site gives it."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONNOUSERSITE")}


@pytest.mark.slow
def test_editable_install_maps_integrations(tmp_path):
    # A fresh venv without pip of its own. `--system-site-packages` would give it the *base*
    # interpreter's packages: run from inside a venv, that is not the active environment (an
    # old setuptools there fails with "invalid command 'bdist_wheel'"). So the new venv gets the
    # running interpreter's own site directories through a .pth file instead: pip, setuptools
    # and wheel are exactly those of the environment running this test, wherever it runs.
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    py = str(venv / "bin" / "python")
    venv_site = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).strip())
    parent = venv_site / "_nbce_test_parent_env.pth"
    parent.write_text("\n".join(_site_dirs()) + "\n", encoding="utf-8")
    import setuptools

    seen = _run([py, "-c", "import setuptools; print(setuptools.__file__)"], env=_clean_env()).strip()
    assert Path(seen) == Path(setuptools.__file__), "the test venv must build with this environment's setuptools"
    _run([py, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-q", "-e", str(REPO)], cwd=tmp_path,
         env=_clean_env())
    # the console script is installed and points at the CLI
    script = (venv / "bin" / "nbce-rag").read_text(encoding="utf-8")
    assert "nbce_rag.cli" in script and "main" in script
    # import with the venv's own site only: the editable finder must map both packages
    parent.unlink()
    integ, pkg = _where(py, cwd=tmp_path, env=_clean_env())
    # resolved: a development checkout may also link nbce_rag/integrations -> ../integrations
    assert Path(integ).resolve() == (REPO / "integrations" / "__init__.py").resolve()
    assert Path(pkg).resolve() == (REPO / "nbce_rag" / "__init__.py").resolve()


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
    # through the interpreter running the tests, not a `nbce-rag` that may or may not be on PATH
    out = _run([sys.executable, "-m", "nbce_rag.cli", "generate", "--help"], cwd=REPO)
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
