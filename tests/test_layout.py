"""The layout's rules (DESIGN.md): imports point one way, no stage imports another, the studio stays torch-free."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

# Each package and the packages it may import from this project (below it in DESIGN.md's picture).
MAY_IMPORT = {
    "pipeline": {"pipeline"},
    "gpt": {"gpt", "pipeline", "bpe_rust"},
    "tasks": {"tasks", "gpt", "pipeline"},  # task datasets and their graders, shared by training and evaluation
    "trainer": {"trainer", "tasks", "gpt", "pipeline", "bpe_rust"},
    "evals": {"evals", "tasks", "gpt", "pipeline"},  # trainer/ holds stage commands only, and no stage imports another
    "studio": {"studio", "nanostudio", "gpt", "pipeline"},  # stages are run as commands, never imported
}
OURS = set(MAY_IMPORT) | {"nanostudio", "bpe_rust", "tests", "bench"}


def _imports(path: Path) -> list[str]:
    """Every module a file imports, at any depth (lazy imports inside functions count too)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append(node.module)
            out += [f"{node.module}.{alias.name}" for alias in node.names]
    return out


def _files(package: str) -> list[Path]:
    return sorted(p for p in (REPO / package).rglob("*.py") if "migrations" not in p.parts)


@pytest.mark.parametrize("package", sorted(MAY_IMPORT))
def test_imports_point_one_way(package):
    wrong = []
    for path in _files(package):
        for name in _imports(path):
            top = name.split(".")[0]
            if top in OURS and top not in MAY_IMPORT[package]:
                wrong.append(f"{path.relative_to(REPO)} imports {name}")
    assert not wrong, "\n".join(wrong)


def test_no_stage_imports_another_stage():
    from pipeline import stages

    modules = {s.module for s in stages.STAGES} | {"trainer.chat_cli"}
    wrong = []
    for module in modules:
        path = REPO / (module.replace(".", "/") + ".py")
        if not path.exists():
            continue
        for name in _imports(path):
            if name in modules - {module}:
                wrong.append(f"{module} imports {name}")
    assert not wrong, "\n".join(wrong)


def test_pipeline_never_imports_torch():
    """Not even lazily: the studio's pages import pipeline/ and must not pay for torch."""
    wrong = [f"{p.relative_to(REPO)} imports {n}" for p in _files("pipeline") for n in _imports(p)
             if n.split(".")[0] in ("torch", "safetensors", "gpt")]
    assert not wrong, "\n".join(wrong)


def test_the_studio_pages_supervisor_and_runjob_load_no_torch():
    """Only chat serving loads gpt/ (and torch); everything a page, the worker or runjob imports stays light."""
    code = (
        "import os, sys\n"
        "os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'nanostudio.settings')\n"
        "import django; django.setup()\n"
        "import nanostudio.urls, nanostudio.asgi, studio.views, studio.actions, studio.supervisor, studio.tasks\n"
        "import studio.consumers, studio.live, studio.chat, studio.management.commands.runjob\n"
        "import pipeline.config, pipeline.estimate, pipeline.report, pipeline.checkpoints, pipeline.harness\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'gpt', 'trainer', 'evals'))\n"
        "print(' '.join(loaded))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [], f"loaded: {out.stdout.strip()}"
