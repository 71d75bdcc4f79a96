"""Every code block of Getting started runs, its set-up matches the README's, and every results file is cited."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tools.test_main_job import DEFAULT_MODEL_GROUP, MAIN_JOB

ROOT = Path(__file__).parents[2]
GETTING_STARTED = ROOT / "docs" / "getting-started.md"


def code_blocks(path: Path, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", path.read_text(), flags=re.S)


def setup_commands(path: Path) -> list[str]:
    return [line for block in code_blocks(path, "bash") for line in block.splitlines() if line.startswith("pip ")]


def test_getting_started_set_up_is_the_readme_set_up():
    assert setup_commands(GETTING_STARTED) == setup_commands(ROOT / "README.md")
    assert (
        setup_commands(ROOT / "README.md")
        == [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.startswith("pip ")][:2]
    )


def test_the_main_job_the_tests_run_is_the_readme_main_job():
    """The main job's CLI test runs ``MAIN_JOB`` verbatim; it is the README's and getting started's."""
    for page in (ROOT / "README.md", GETTING_STARTED):
        commands = [line.strip() for block in code_blocks(page, "bash") for line in block.splitlines()]
        assert MAIN_JOB in commands, page


@pytest.mark.model
@DEFAULT_MODEL_GROUP
def test_getting_started_code_blocks_run(tmp_path, monkeypatch):
    """Python blocks run in order in one namespace; shell blocks (other than set-up, and the
    README's main job, which tests/tools/test_main_job.py runs verbatim and reads) run in the same folder."""
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```(python|bash)\n(.*?)```", GETTING_STARTED.read_text(), flags=re.S)
    assert len(blocks) >= 5
    namespace: dict = {}
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    for language, code in blocks:
        if language == "python":
            exec(compile(code, str(GETTING_STARTED), "exec"), namespace)
            continue
        for line in code.strip().splitlines():
            if line.startswith("pip "):
                continue  # the set-up: CI runs exactly these commands before the tests
            if line.strip() == MAIN_JOB:
                continue  # run and read by the main job's CLI test
            result = subprocess.run(shlex.split(line), capture_output=True, text=True, env=env, timeout=600)
            assert result.returncode == 0, f"{line}\n{result.stderr[-2000:]}"
    assert (tmp_path / "my_policy.png").exists()


def cites(text: str, name: str) -> bool:
    """Whether ``text`` names the results file ``name``, or its run as ``stem.*`` / ``stem.{json,log}``
    (a run's JSON and its log are one result)."""
    stem = name.rsplit(".", 1)[0]
    return name in text or re.search(rf"\b{re.escape(stem)}\.(\*|\{{|json|log|txt)", text) is not None


def test_every_results_file_is_cited_by_a_page():
    """A results file in ``benchmarks/results/`` that no docs page, the README or the benchmark
    notes cite is a figure nobody can find: it is removed or cited."""
    pages = [*ROOT.joinpath("docs").rglob("*.md"), ROOT / "README.md", ROOT / "benchmarks" / "NOTES.md"]
    text = "\n".join(page.read_text() for page in pages)
    results = sorted(p.name for p in ROOT.joinpath("benchmarks", "results").iterdir() if p.is_file())
    assert results, "no results files found"
    uncited = [name for name in results if not cites(text, name)]
    assert not uncited, f"results files no page cites: {uncited}"


def test_citation_matches_names_and_runs():
    assert cites("see `model_h200_v19.*`", "model_h200_v19.log")
    assert cites("(results/e2e_h200.json)", "e2e_h200.json")
    assert not cites("model_h200_v19.json", "model_h200_v1.json")
