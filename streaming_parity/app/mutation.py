"""``parity mutants``: the tests that guard the verdicts, checked by breaking the judge on purpose.

mutmut (``[tool.mutmut]`` in pyproject.toml) mutates the judging modules (metrics, tolerances,
comparison, ties) one change at a time and runs the judge's own tests against each mutant. A
mutant the tests do not kill is a change to a verdict nobody would notice: each survivor is
listed, with its diff, in ``mutants.json`` and in the nightly report.

mutmut works in a ``mutants/`` folder beside the sources; the run happens in a temporary copy of
the checkout so that the working tree is left as it was.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from streaming_parity.core.errors import InvalidInput

ROOT = Path(__file__).resolve().parents[2]
MUTANTS_FILE = "mutants.json"
# Survivors whose diff is written out in full; the rest are listed by name.
DIFF_LIMIT = 200


def _mutmut() -> list[str]:
    executable = Path(sys.executable).with_name("mutmut")
    if not executable.exists():
        raise InvalidInput("mutmut is not installed (pip install mutmut): it runs the judge's mutation tests")
    return [str(executable)]


def _copy_checkout(destination: Path) -> None:
    """The files git tracks (and untracked ones it does not ignore), as they are in the working tree."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def parse_results(text: str) -> dict[str, str]:
    """``mutmut results --all true`` lines (``name: status``) as {mutant: status}."""
    statuses = {}
    for line in text.splitlines():
        name, sep, status = line.strip().rpartition(": ")
        if sep and name:
            statuses[name] = status.strip()
    return statuses


def run_mutation_tests(*, workers: int = 2, progress: Callable[[str], None] = lambda _m: None) -> dict:
    """Run mutmut over the judging modules; the outcome as data (what ``mutants.json`` holds)."""
    command = _mutmut()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="parity-mutants-") as scratch:
        work = Path(scratch)
        _copy_checkout(work)
        progress(f"mutating the judge in a copy of the checkout ({work})")
        run = subprocess.run([*command, "run", "--max-children", str(workers)], cwd=work, capture_output=True,
                             text=True)
        listed = subprocess.run([*command, "results", "--all", "true"], cwd=work, capture_output=True, text=True)
        statuses = parse_results(listed.stdout)
        if not statuses:
            tail = (run.stdout + run.stderr).strip().splitlines()[-5:]
            raise RuntimeError("mutmut produced no results: " + " / ".join(tail))
        survivors = sorted(name for name, status in statuses.items() if status == "survived")
        diffs = {}
        for name in survivors[:DIFF_LIMIT]:
            shown = subprocess.run([*command, "show", name], cwd=work, capture_output=True, text=True)
            diffs[name] = shown.stdout.strip()
    counts = Counter(statuses.values())
    return {
        "tool": "mutmut",
        "seconds": round(time.perf_counter() - started, 1),
        "totals": dict(sorted(counts.items())),
        "mutants": len(statuses),
        "survived": [{"name": name, "diff": diffs.get(name)} for name in survivors],
        "no_tests": sorted(name for name, status in statuses.items() if status == "no tests"),
    }


def write_mutants(outcome: dict, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / MUTANTS_FILE
    path.write_text(json.dumps(outcome, indent=1) + "\n")
    return path


def load_mutants(directory: Path) -> dict | None:
    path = Path(directory) / MUTANTS_FILE
    return json.loads(path.read_text()) if path.is_file() else None
