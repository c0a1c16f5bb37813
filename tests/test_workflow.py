"""The workflows cannot run here: check their YAML, their structure, that their commands exist and
that they install and test through .ci/run, the script this project's own CI runs."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from streaming_parity.app.cli import build_parser
from streaming_parity.app.pytest_plugin import MARKERS

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = ROOT / ".github" / "workflows"
CI = WORKFLOWS / "ci.yml"
NIGHTLY = WORKFLOWS / "nightly.yml"
CI_SCRIPT = ROOT / ".ci" / "run"
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
CRON_FIELD = re.compile(r"^(\*|\d+(-\d+)?)(/\d+)?(,(\*|\d+(-\d+)?)(/\d+)?)*$")
# Full-size bound: a standard hosted Linux runner has 16 GB.
FULL_SIZE_BOUND_GB = 14


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def triggers(workflow: dict) -> dict:
    # YAML 1.1 reads the bare key `on` as the boolean True.
    return workflow.get("on", workflow.get(True)) or {}


def all_jobs() -> list[tuple[str, str, dict]]:
    return [(path.name, name, job) for path in (CI, NIGHTLY) for name, job in load(path)["jobs"].items()]


def linux_jobs() -> list[tuple[str, str, dict]]:
    return [entry for entry in all_jobs() if str(entry[2]["runs-on"]).startswith("ubuntu")]


def macos_jobs() -> list[tuple[str, str, dict]]:
    return [entry for entry in all_jobs() if str(entry[2]["runs-on"]).startswith("macos")]


def make_targets() -> set[str]:
    return set(re.findall(r"^([A-Za-z][\w-]*):", (ROOT / "Makefile").read_text(), flags=re.MULTILINE))


def make_recipe(target: str) -> str:
    match = re.search(rf"^{re.escape(target)}:.*\n((?:\t.*\n?)*)", (ROOT / "Makefile").read_text(), flags=re.MULTILINE)
    assert match, f"no make target {target}"
    return match.group(1)


def script_steps() -> set[str]:
    """The steps .ci/run accepts (its final `case`)."""
    return set(re.findall(r"^\s+([a-z-]+)\) step_", CI_SCRIPT.read_text(), flags=re.MULTILINE))


def script_default_steps() -> list[str]:
    match = re.search(r"^\s+set -- (.+)$", CI_SCRIPT.read_text(), flags=re.MULTILINE)
    assert match, ".ci/run has no default steps"
    return match.group(1).split()


def script_function(name: str) -> str:
    match = re.search(rf"^{name}\(\) \{{\n(.*?)^\}}", CI_SCRIPT.read_text(), flags=re.MULTILINE | re.DOTALL)
    assert match, f".ci/run has no function {name}"
    return match.group(1)


def cli_subcommands() -> set[str]:
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return set(subparsers.choices)


def split_commands(script: str) -> list[list[str]]:
    """The simple commands of a shell script, split into words (continuations and pipes split)."""
    commands = []
    for line in script.replace("\\\n", " ").splitlines():
        for part in re.split(r"&&|\|\||;|\|", line):
            try:
                words = shlex.split(part, comments=True)
            except ValueError:  # a quote spanning a split point: not a command this test checks
                continue
            if words:
                commands.append(words)
    return commands


def run_steps(job: dict) -> list[dict]:
    return [step for step in job["steps"] if "run" in step]


def script_calls(job: dict) -> list[str]:
    """The .ci/run steps a job calls, in order."""
    return [step for s in run_steps(job) for words in split_commands(s["run"])
            if words[0] == ".ci/run" for step in words[1:] or script_default_steps()]


def uses(job: dict, action: str) -> list[dict]:
    return [s for s in job["steps"] if str(s.get("uses", "")).startswith(f"{action}@")]


# -- both workflows --------------------------------------------------------------------------------

@pytest.mark.parametrize("path", [CI, NIGHTLY], ids=lambda p: p.name)
def test_workflow_is_valid_yaml_and_every_step_is_a_run_or_a_uses(path):
    workflow = load(path)
    assert workflow["name"] and workflow["jobs"]
    for name, job in workflow["jobs"].items():
        assert job.get("runs-on") and job.get("timeout-minutes"), f"{path.name} {name}"
        assert job.get("steps"), f"{path.name}: job {name} has no steps"
        for step in job["steps"]:
            assert ("uses" in step) != ("run" in step), f"{name}: a step needs exactly one of uses/run: {step}"
        assert str(job["steps"][0].get("uses", "")).startswith("actions/checkout@")


def test_ci_runs_on_push_and_pull_request_on_linux_and_apple_silicon():
    workflow = load(CI)
    on = triggers(workflow)
    assert "push" in on and "pull_request" in on
    assert {str(job["runs-on"]) for job in workflow["jobs"].values()} == {"ubuntu-latest", "macos-14"}


def test_nightly_is_scheduled():
    on = triggers(load(NIGHTLY))
    assert on.get("schedule"), "the nightly workflow must be scheduled"
    for entry in on["schedule"]:
        fields = entry["cron"].split()
        assert len(fields) == 5 and all(CRON_FIELD.match(f) for f in fields), entry["cron"]
    assert {str(job["runs-on"]) for job in load(NIGHTLY)["jobs"].values()} == {"ubuntu-latest", "macos-14"}


def test_the_ci_script_is_valid_bash_and_its_default_is_system_install_lint_test():
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    subprocess.run([bash, "-n", str(CI_SCRIPT)], check=True)
    assert CI_SCRIPT.stat().st_mode & 0o111, ".ci/run must be executable"
    assert script_default_steps() == ["system", "install", "lint", "test"]
    assert set(script_default_steps()) <= script_steps()


@pytest.mark.parametrize("workflow_job", all_jobs(), ids=lambda e: f"{e[0]}:{e[1]}")
def test_every_job_installs_through_the_ci_script(workflow_job):
    """One install for the local CI and both workflows: no job installs packages by itself."""
    _, _, job = workflow_job
    calls = script_calls(job)
    assert {"install", "install-torch-free", "mlx", "test"} & set(calls), "the job must install through .ci/run"
    for step in run_steps(job):
        for words in split_commands(step["run"]):
            assert not ({"pip", "pip3", "apt-get", "uv"} & {Path(w).name for w in words}), \
                f"install through .ci/run, not directly: {words}"
    assert set(calls) <= script_steps(), f"unknown .ci/run step in {calls}"
    setup = uses(job, "actions/setup-python")
    assert setup and setup[0]["with"]["cache"] == "pip", "the pip cache (setup-python cache: pip)"
    assert {"pyproject.toml", "constraints.txt"} <= set(setup[0]["with"]["cache-dependency-path"].split())


def torch_free(job: dict) -> bool:
    return "install-torch-free" in script_calls(job)


@pytest.mark.parametrize("workflow_job", [e for e in linux_jobs() if not torch_free(e[2])],
                         ids=lambda e: f"{e[0]}:{e[1]}")
def test_linux_jobs_take_cpu_torch_and_install_openblas_and_chromium(workflow_job):
    _, _, job = workflow_job
    assert job["env"]["TORCH_INDEX"] == CPU_TORCH_INDEX, "PyPI's Linux torch is the CUDA build"
    calls = script_calls(job)
    assert "system" in calls and "install" in calls and calls.index("system") < calls.index("install")
    system = script_function("step_system")
    assert "libopenblas0-pthread" in system and "chromium" in system and "apt-get install" in system


@pytest.mark.parametrize("workflow_job", [e for e in all_jobs() if torch_free(e[2])], ids=lambda e: f"{e[0]}:{e[1]}")
def test_torch_free_jobs_install_no_torch_and_mlx_on_linux_gets_openblas(workflow_job):
    _, _, job = workflow_job
    calls = script_calls(job)
    assert "install" not in calls and "TORCH_INDEX" not in job.get("env", {}), "a torch-free job installs no torch"
    extras = job["env"]["EXTRAS"]
    assert set(filter(None, extras.split(","))) <= {"onnx", "mlx", "peers", "dev"}, extras
    if "mlx" in extras and str(job["runs-on"]).startswith("ubuntu"):
        assert "system" in calls and calls.index("system") < calls.index("install-torch-free")
    step = script_function("step_install_torch_free")
    assert 'find_spec(name) is not None' in step and '"torch", "nemo"' in step and "-c constraints.txt" in step


def test_the_makefile_passes_a_torch_index_only_when_one_is_set():
    recipe = make_recipe("$(STAMP)")
    assert "$(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))" in recipe and "torch==2.13.0" in recipe
    assert re.search(r"^TORCH_INDEX \?=\s*$", (ROOT / "Makefile").read_text(), flags=re.MULTILINE), \
        "TORCH_INDEX must default to unset (the local pip setup serves the CPU build)"
    make = shutil.which("make")
    if make is None:
        pytest.skip("no make")

    def torch_install(*variables: str) -> str:
        out = subprocess.run([make, "-n", "-B", "install", *variables], cwd=ROOT, capture_output=True,
                             text=True, check=True, env={"PATH": "/usr/bin:/bin"}).stdout
        return next(line for line in out.splitlines() if "torch==" in line)

    assert "index-url" not in torch_install()
    assert f"--index-url {CPU_TORCH_INDEX} " in torch_install(f"TORCH_INDEX={CPU_TORCH_INDEX}")


def test_the_ci_linux_job_runs_the_ci_scripts_default_steps_in_order():
    job = load(CI)["jobs"]["linux"]
    assert script_calls(job) == script_default_steps()
    assert make_recipe("lint").split() == ["$(VENV)/bin/ruff", "check", ".", "$(VENV)/bin/lint-imports"]
    assert script_function("step_lint").split() == ["make", "lint"]
    assert "run_suite test" in script_function("step_test")


def test_the_ci_script_refuses_a_test_run_that_passed_nothing():
    suite = script_function("run_suite")
    assert "PIPESTATUS[0]" in suite and "[0-9]+ passed" in suite and "no:cacheprovider" in suite


@pytest.mark.parametrize("workflow_job", macos_jobs(), ids=lambda e: f"{e[0]}:{e[1]}")
def test_macos_jobs_run_mlx_on_apple_silicon_and_metal(workflow_job):
    _, _, job = workflow_job
    assert job["runs-on"] == "macos-14", "an arm64 runner: MLX's macOS wheels are Apple Silicon only"
    calls = script_calls(job)
    assert ("mlx" in calls or (torch_free(job) and "mlx" in job["env"]["EXTRAS"])) and \
        "TORCH_INDEX" not in job.get("env", {})
    assert re.search(r"-m mlx\b", make_recipe("test-mlx"))
    mlx = script_function("step_mlx")
    assert "run_suite test-mlx" in mlx and "require_apple_silicon" in mlx and "check_metal" in mlx
    assert "require_apple_silicon" in script_function("step_install_torch_free")
    assert "check_metal" in script_function("step_install_torch_free")
    assert "metal.is_available()" in script_function("check_metal")
    assert "arm64" in script_function("require_apple_silicon")


@pytest.mark.parametrize("workflow_job", [e for e in all_jobs() if e[0] == "ci.yml"], ids=lambda e: e[1])
def test_ci_jobs_keep_the_junit_xml_and_the_reports_folder(workflow_job):
    _, _, job = workflow_job
    junit = job["env"]["JUNIT"]
    assert junit.endswith(".xml")
    upload = uses(job, "actions/upload-artifact")
    assert upload and upload[0].get("if") == "always()"
    paths = [line.strip() for line in upload[0]["with"]["path"].splitlines()]
    assert "${{ env.JUNIT }}" in paths and "reports/" in paths
    assert "$(if $(JUNIT),--junitxml=$(JUNIT))" in (ROOT / "Makefile").read_text()
    for target in ("test", "test-mlx"):
        assert make_recipe(target).split()[0] == "$(PYTEST)"


def test_fixture_caches_are_keyed_on_what_the_fixture_hash_covers(monkeypatch):
    """The fixture hash covers streaming_parity/fixtures/models.py (configs, builder version, seed) and the corpus."""
    from streaming_parity.fixtures import models

    monkeypatch.delenv("PARITY_CACHE", raising=False)
    cache_dir = models.cache_root().relative_to(ROOT).as_posix()
    hashed = {Path(models.__file__).resolve().relative_to(ROOT).as_posix(), models.CORPUS.relative_to(ROOT).as_posix()}
    checked = 0
    for _, name, job in all_jobs():
        for cache in uses(job, "actions/cache/restore"):
            if cache["with"]["path"] != cache_dir:
                continue
            files = set(re.findall(r"'([^']+)'", re.search(r"hashFiles\(([^)]*)\)", cache["with"]["key"]).group(1)))
            assert hashed <= files, f"{name}: the fixture cache key must hash {sorted(hashed)}"
            saves = [s for s in uses(job, "actions/cache/save") if s["with"]["path"] == cache_dir]
            primary_key = "${{ steps." + cache["id"] + ".outputs.cache-primary-key }}"
            assert saves and saves[0]["with"]["key"] == primary_key
            assert "cache-hit != 'true'" in saves[0]["if"]
            checked += 1
    assert checked >= 4, "every test job caches the fixture builds"


# -- the nightly ------------------------------------------------------------------------------------

@pytest.mark.parametrize("job_name", list(load(NIGHTLY)["jobs"]))
def test_every_nightly_job_uploads_reports_and_writes_the_summary(job_name):
    job = load(NIGHTLY)["jobs"][job_name]
    uploads = uses(job, "actions/upload-artifact")
    assert uploads and uploads[0]["with"]["path"].rstrip("/") == "reports"
    assert uploads[0].get("if") == "always()", "reports must be uploaded when the matrix fails too"
    summary = [s for s in run_steps(job) if "GITHUB_STEP_SUMMARY" in s["run"]]
    assert summary and "report.md" in summary[0]["run"] and summary[0].get("if") == "always()"
    assert any("parity nightly" in s["run"] or "parity report" in s["run"] for s in run_steps(job)) \
        or "full-size" in script_calls(job)


def test_the_night_is_recorded_once_judged_on_three_machines_without_nemo_and_reported_as_one():
    """record (NeMo) -> linux-onnx, linux-mlx, macos-mlx (no torch) -> report: each hand-over a workflow artifact."""
    jobs = load(NIGHTLY)["jobs"]
    record = jobs["record"]
    [recording] = [w for s in run_steps(record) for w in split_commands(s["run"]) if "--stage" in w]
    recordings = recording[recording.index("--recordings") + 1]
    work_dir = recording[recording.index("--work-dir") + 1]
    assert recording[recording.index("--stage") + 1] == "record" and "install" in script_calls(record)
    handed = [u for u in uses(record, "actions/upload-artifact") if u["with"]["name"] == "night"]
    assert handed and {recordings, work_dir} <= {str(Path(handed[0]["with"]["path"]) / p) for p in
                                                 ("recordings", "artifacts")}
    cached = uses(record, "actions/cache/save")
    assert any(c["with"]["path"] == recordings for c in cached), "recordings are kept from night to night"
    candidates = {name: job for name, job in jobs.items() if job.get("needs") == "record"}
    assert {"linux-onnx", "linux-mlx", "macos-mlx"} <= set(candidates)
    assert candidates["macos-mlx"]["runs-on"] == "macos-14"
    for name, job in candidates.items():
        assert torch_free(job), f"{name} must run without torch and NeMo"
        assert uses(job, "actions/download-artifact")[0]["with"]["name"] == "night"
        [stage] = [w for s in run_steps(job) for w in split_commands(s["run"]) if "--stage" in w]
        assert stage[stage.index("--stage") + 1] == "candidates"
        assert stage[stage.index("--recordings") + 1] == recordings and stage[stage.index("--work-dir") + 1] == work_dir
        assert stage[stage.index("--job") + 1] == name
        assert uses(job, "actions/upload-artifact")[0]["with"]["name"] == f"nightly-results-{name}"
    report = jobs["report"]
    assert set(candidates) | {"record"} <= set(report["needs"]) and torch_free(report)
    assert uses(report, "actions/download-artifact")[0]["with"]["pattern"] == "nightly-results-*"
    assert any("parity report" in s["run"] and "--history reports" in s["run"] for s in run_steps(report))


def test_the_full_size_job_is_bounded_to_a_hosted_runner_and_reports_its_peak():
    job = load(NIGHTLY)["jobs"]["full-size"]
    assert job["runs-on"] == "ubuntu-latest" and "full-size" in script_calls(job)
    bound = job["env"]["FULL_SIZE_MEMORY_MAX"]
    assert re.fullmatch(r"\d+G", bound) and int(bound[:-1]) <= FULL_SIZE_BOUND_GB
    assert job["env"]["FULL_SIZE_OUT"] == "reports"
    step = next(s for s in run_steps(job) if "full-size" in script_calls({"steps": [s]}))
    assert step["env"]["PARITY_CACHE"].startswith("${{ runner.temp }}"), "the 2.5 GB checkpoint stays out of caches"
    bounded = script_function("bounded")
    assert "MemoryMax=" in bounded and "/usr/bin/time -v" in bounded and "GITHUB_STEP_SUMMARY" in bounded
    assert "Maximum resident set size" in bounded
    # The workflow states the peak measured for the command .ci/run runs, and it is within the bound.
    measured = re.search(r"measured peak RSS ([\d.]+) GB", NIGHTLY.read_text())
    assert measured and float(measured.group(1)) < FULL_SIZE_BOUND_GB


def test_every_command_uses_existing_make_targets_script_steps_cli_subcommands_and_markers():
    targets, subcommands, steps = make_targets(), cli_subcommands(), script_steps()
    scripts = [step["run"] for _, _, job in all_jobs() for step in run_steps(job)]
    # .ci/run's own commands too, with its variables given example values.
    scripts.append(CI_SCRIPT.read_text().replace('"$out"', "reports").replace('"$target"', "test"))
    checked = 0
    for script in scripts:
        for words in split_commands(script):
            program = Path(words[0]).name
            if program == "make":
                goals = [w for w in words[1:] if "=" not in w and not w.startswith("-") and ">" not in w]
                assert goals and set(goals) <= targets, f"unknown make target: {words}"
                checked += 1
            elif words[0] == ".ci/run":
                assert set(words[1:]) <= steps, f"unknown .ci/run step: {words}"
                checked += 1
            elif program == "parity":
                assert words[1] in subcommands, f"unknown parity subcommand: {words}"
                build_parser().parse_args(words[1:])  # the options exist too (exits 2 otherwise)
                checked += 1
            elif "pytest" in words and "-m" in words[words.index("pytest"):]:
                options = words[words.index("pytest"):]
                assert options[options.index("-m") + 1] in MARKERS, f"unknown pytest marker: {words}"
                checked += 1
    assert checked >= 15
    for target in ("test-mlx", "test-onnx"):
        marker = re.search(r"-m (\w+)", make_recipe(target)).group(1)
        assert marker in MARKERS
