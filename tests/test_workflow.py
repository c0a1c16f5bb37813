"""The nightly workflow cannot run here: check its YAML, its structure and that its commands exist."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from conftest import MARKERS
from harness.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
WORKFLOW = ROOT / ".github" / "workflows" / "nightly.yml"
CRON_FIELD = re.compile(r"^(\*|\d+(-\d+)?)(/\d+)?(,(\*|\d+(-\d+)?)(/\d+)?)*$")


def load_workflow() -> dict:
    return yaml.safe_load(WORKFLOW.read_text())


def triggers(workflow: dict) -> dict:
    # YAML 1.1 reads the bare key `on` as the boolean True.
    return workflow.get("on", workflow.get(True)) or {}


def make_targets() -> set[str]:
    return set(re.findall(r"^([A-Za-z][\w-]*):", (ROOT / "Makefile").read_text(), flags=re.MULTILINE))


def cli_subcommands() -> set[str]:
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return set(subparsers.choices)


def run_commands(step: dict) -> list[list[str]]:
    """The simple commands of a ``run`` script, split into words (continuations and pipes split)."""
    commands = []
    for line in step["run"].replace("\\\n", " ").splitlines():
        for part in re.split(r"&&|\|\||;|\|", line):
            words = shlex.split(part, comments=True)
            if words:
                commands.append(words)
    return commands


def test_workflow_is_valid_yaml_with_a_schedule_and_jobs():
    workflow = load_workflow()
    on = triggers(workflow)
    assert on.get("schedule"), "the nightly workflow must be scheduled"
    for entry in on["schedule"]:
        fields = entry["cron"].split()
        assert len(fields) == 5 and all(CRON_FIELD.match(f) for f in fields), entry["cron"]
    jobs = workflow["jobs"]
    assert {job["runs-on"] for job in jobs.values()} >= {"macos-14", "ubuntu-latest"}
    for name, job in jobs.items():
        assert job.get("steps"), f"job {name} has no steps"
        for step in job["steps"]:
            assert ("uses" in step) != ("run" in step), f"{name}: a step needs exactly one of uses/run: {step}"


@pytest.mark.parametrize("job_name", list(load_workflow()["jobs"]))
def test_every_job_uploads_reports_and_writes_the_summary(job_name):
    steps = load_workflow()["jobs"][job_name]["steps"]
    uploads = [s for s in steps if str(s.get("uses", "")).startswith("actions/upload-artifact@")]
    assert uploads and uploads[0]["with"]["path"].rstrip("/") == "reports"
    assert uploads[0].get("if") == "always()", "reports must be uploaded when the matrix fails too"
    summary = [s for s in steps if "GITHUB_STEP_SUMMARY" in s.get("run", "")]
    assert summary and "report.md" in summary[0]["run"] and summary[0].get("if") == "always()"
    assert any("parity nightly" in s.get("run", "") for s in steps)


def test_the_macos_job_installs_with_uv_and_runs_the_mlx_suites_and_nightly():
    job = next(j for j in load_workflow()["jobs"].values() if j["runs-on"] == "macos-14")
    runs = " ".join(s.get("run", "") for s in job["steps"])
    assert any(str(s.get("uses", "")).startswith("astral-sh/setup-uv@") for s in job["steps"])
    assert "uv pip install" in runs and "pytest -m mlx" in runs and "--backends nemo,mlx" in runs


def test_every_run_step_uses_existing_make_targets_cli_subcommands_and_markers():
    targets, subcommands = make_targets(), cli_subcommands()
    checked = 0
    for job in load_workflow()["jobs"].values():
        for step in job["steps"]:
            if "run" not in step:
                continue
            for words in run_commands(step):
                program = Path(words[0]).name
                if program == "make":
                    goals = [w for w in words[1:] if "=" not in w and not w.startswith("-")]
                    assert goals and set(goals) <= targets, f"unknown make target: {words}"
                    checked += 1
                elif program == "parity":
                    assert words[1] in subcommands, f"unknown parity subcommand: {words}"
                    build_parser().parse_args(words[1:])  # the options exist too (exits 2 otherwise)
                    checked += 1
                elif "pytest" in words and "-m" in words[words.index("pytest"):]:
                    options = words[words.index("pytest"):]
                    assert options[options.index("-m") + 1] in MARKERS, f"unknown pytest marker: {words}"
                    checked += 1
    assert checked >= 4
