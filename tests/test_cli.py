"""The CLI's happy paths and its exit codes on tolerance violations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from streaming_parity.app.cli import EXIT_OK, EXIT_VIOLATION, main

pytestmark = pytest.mark.nemo
SPEECH = Path(__file__).resolve().parent.parent / "streaming_parity" / "fixtures" / "speech" / "utt02.wav"


def test_transcribe_prints_one_line_per_utterance_and_lookahead(tiny_nemo, capsys):
    assert main(["transcribe", str(tiny_nemo), str(SPEECH), "--att-context", "70,13", "--att-context", "70,1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[:2] for line in lines] == [["utt02.wav", "[70,13]"], ["utt02.wav", "[70,1]"]]


def test_transcribe_takes_options_anywhere_among_its_arguments(tiny_nemo, capsys):
    other = SPEECH.with_name("utt04.wav")
    assert main(["transcribe", str(tiny_nemo), "--att-context", "70,13", str(SPEECH), str(other)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[:2] for line in lines] == [["utt02.wav", "[70,13]"], ["utt04.wav", "[70,13]"]]
    with pytest.raises(SystemExit):  # an unknown option is still refused, wherever it stands
        main(["transcribe", str(tiny_nemo), "--att-context", "70,13", str(SPEECH), "--no-such-option"])


def test_compare_passes_writes_results_and_fails_on_a_stricter_file(tiny_nemo, tmp_path, capsys):
    results = tmp_path / "results.json"
    code = main(["compare", str(tiny_nemo), "--audio", str(SPEECH), "--att-context", "70,6", "--json", str(results)])
    out = capsys.readouterr().out
    assert code == EXIT_OK, out
    data = json.loads(results.read_text())
    assert data["passed"] and data["schema_version"] == 1
    assert data["comparisons"][0]["pair"] == "streaming~offline@70,6"

    strict = tmp_path / "strict.toml"
    strict.write_text('[float32."streaming~offline".encoder]\nmax_abs = 1e-9\n')
    code = main(["compare", str(tiny_nemo), "--audio", str(SPEECH), "--att-context", "70,6",
                 "--tolerances", str(strict)])
    out = capsys.readouterr().out
    assert code == EXIT_VIOLATION
    assert "first divergent tap encoder" in out and "max_abs" in out


def test_judge_reapplies_tolerances_without_rerunning(tiny_nemo, tmp_path, capsys, monkeypatch):
    results = tmp_path / "results.json"
    assert main(["compare", str(tiny_nemo), "--audio", str(SPEECH), "--att-context", "70,13",
                 "--json", str(results)]) == EXIT_OK
    capsys.readouterr()
    import streaming_parity.backends.nemo

    def never(*args, **kwargs):
        raise AssertionError("judge must not run a model")

    monkeypatch.setattr(streaming_parity.backends.nemo, "NemoBackend", never)
    default = Path(__file__).resolve().parent.parent / "streaming_parity" / "judge" / "tolerances.toml"
    assert main(["judge", str(results), "--tolerances", str(default)]) == EXIT_OK
    strict = tmp_path / "strict.toml"
    strict.write_text('[float32."streaming~offline".encoder]\nmax_abs = 1e-9\n')
    assert main(["judge", str(results), "--tolerances", str(strict), "--json", str(tmp_path / "j.json")]) \
        == EXIT_VIOLATION
    assert "first divergent tap encoder" in capsys.readouterr().out
    assert not json.loads((tmp_path / "j.json").read_text())["passed"]


THREADS_PROBE = """
import json
from streaming_parity.app.cli import main
main(["--threads", "2", "fixtures", "--model", "nonexistent"])  # the limit applies before the command runs
import torch
from threadpoolctl import threadpool_info
from streaming_parity.backends.onnx.sessions import session_options
from streaming_parity.judge.results import environment
print(json.dumps({"torch": torch.get_num_threads(), "onnxruntime": session_options(None).intra_op_num_threads,
                  "blas": sorted({pool["num_threads"] for pool in threadpool_info()}),
                  "recorded": environment()["threads"]}))
"""


def test_threads_option_limits_every_library_and_is_recorded():
    """``parity --threads N``: torch, the BLAS pools and ONNX Runtime sessions all get N (in a fresh
    process: this one is already limited to one thread by conftest)."""
    import os
    import subprocess
    import sys

    pytest.importorskip("onnxruntime")
    from streaming_parity.core.system.threads import LIBRARY_VARIABLES, PROJECT_VARIABLE

    env = {k: v for k, v in os.environ.items() if k not in (*LIBRARY_VARIABLES, PROJECT_VARIABLE)}
    probe = subprocess.run([sys.executable, "-c", THREADS_PROBE], capture_output=True, text=True, env=env,
                           cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert probe.returncode == 0, probe.stderr[-2000:]
    assert json.loads(probe.stdout.strip().splitlines()[-1]) == {
        "torch": 2, "onnxruntime": 2, "blas": [2], "recorded": 2}


@pytest.mark.parametrize("value", ["0", "-1", "two"])
def test_threads_option_refuses_non_positive(value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--threads", value, "fixtures"])
    assert exit_info.value.code == 2
    assert "positive integer" in capsys.readouterr().err
