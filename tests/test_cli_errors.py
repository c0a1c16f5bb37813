"""Bad input through the CLI: one-line errors, the right exit code, no traceback, nothing written."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import yaml
from builders import run_cli

from streaming_parity.app.cli import EXIT_USAGE

SPEECH = Path(__file__).resolve().parent.parent / "streaming_parity" / "fixtures" / "speech" / "utt02.wav"


def assert_one_line_error(err: str, fragment: str) -> None:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert lines, "expected an error message"
    assert lines[-1].startswith("error: "), err
    assert fragment in lines[-1], f"{fragment!r} not in {lines[-1]!r}"
    assert "Traceback" not in err


# -- audio ------------------------------------------------------------------------------------------

def write(path: Path, samples: np.ndarray, rate: int = 16000, subtype: str | None = None) -> Path:
    sf.write(str(path), samples, rate, subtype=subtype)
    return path


def bad_audio_cases(tmp: Path) -> list[tuple[str, Path, str]]:
    speech, _ = sf.read(str(SPEECH), dtype="float32")
    unreadable = tmp / "not_audio.wav"
    unreadable.write_bytes(b"this is not a wav file at all")
    empty = write(tmp / "empty.wav", np.zeros(0, np.float32))
    short = write(tmp / "short.wav", speech[:1000])
    nan = speech.copy()
    nan[100] = np.nan
    nan_path = write(tmp / "nan.wav", nan, subtype="FLOAT")
    stereo = write(tmp / "stereo.wav", np.stack([speech, speech], axis=1))
    narrowband = write(tmp / "8k.wav", speech[::2], rate=8000)
    return [
        ("unreadable", unreadable, "cannot read audio"),
        ("missing", tmp / "missing.wav", "cannot read audio"),
        ("empty", empty, "no samples"),
        ("shorter than 80 ms", short, "at least 80 ms"),
        ("NaN", nan_path, "NaN or Inf"),
        ("stereo", stereo, "--mix-to-mono"),
        ("8 kHz", narrowband, "--resample"),
    ]


@pytest.mark.nemo
def test_bad_audio_is_refused_with_one_line(tmp_path, capsys, tiny_nemo):
    for label, path, fragment in bad_audio_cases(tmp_path):
        before = sorted(tmp_path.iterdir())
        code, out, err = run_cli(capsys, "transcribe", tiny_nemo, path)
        assert code == EXIT_USAGE, label
        assert_one_line_error(err, fragment)
        assert sorted(tmp_path.iterdir()) == before, f"{label}: something was written"


@pytest.mark.nemo
def test_stereo_and_8k_pass_with_their_flags(tmp_path, capsys, tiny_nemo):
    cases = {c[0]: c[1] for c in bad_audio_cases(tmp_path)}
    code, out, _ = run_cli(capsys, "transcribe", tiny_nemo, cases["stereo"], "--mix-to-mono")
    assert code == 0 and "stereo.wav" in out
    code, out, _ = run_cli(capsys, "transcribe", tiny_nemo, cases["8 kHz"], "--resample")
    assert code == 0 and "8k.wav" in out


def test_audio_loader_refuses_without_cli(tmp_path):
    from streaming_parity.interface.audio import AudioError, load_audio

    for _label, path, fragment in bad_audio_cases(tmp_path):
        with pytest.raises(AudioError, match=fragment.replace("-", r"\-")):
            load_audio(path)


# -- hostile .nemo files ----------------------------------------------------------------------------

def _rewrite(source: Path, dest: Path, *, config_edit=None, extra=None) -> Path:
    """Copy a .nemo, optionally editing its config and appending hostile members."""
    with tarfile.open(source, "r:*") as src, tarfile.open(dest, "w") as out:
        for member in src.getmembers():
            data = src.extractfile(member).read() if member.isfile() else None
            if data is not None and member.name.endswith("model_config.yaml") and config_edit:
                config = yaml.safe_load(data)
                config_edit(config)
                data = yaml.safe_dump(config).encode()
                member.size = len(data)
            out.addfile(member, io.BytesIO(data) if data is not None else None)
        for info, payload in (extra or []):
            out.addfile(info, io.BytesIO(payload) if payload is not None else None)
    return dest


def hostile_cases(tiny_nemo: Path, tmp: Path) -> list[tuple[str, Path, str]]:
    def member(name: str, kind=tarfile.REGTYPE, payload: bytes | None = b"x", linkname: str = ""):
        info = tarfile.TarInfo(name)
        info.type = kind
        info.linkname = linkname
        info.size = len(payload) if payload and kind == tarfile.REGTYPE else 0
        return info, payload if kind == tarfile.REGTYPE else None

    def foreign_target(config):
        config["encoder"]["_target_"] = "os.system"

    def foreign_model(config):
        config["target"] = "subprocess.Popen"

    truncated = tmp / "truncated.nemo"
    data = tiny_nemo.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    # Cut inside the weights member, leaving every header readable: only the data offsets tell.
    with tarfile.open(tiny_nemo) as tar:
        weights = next(m for m in tar.getmembers() if m.name.endswith("model_weights.ckpt"))
    cut_weights = tmp / "cut_weights.nemo"
    cut_weights.write_bytes(data[: weights.offset_data + weights.size // 2])
    not_tar = tmp / "not_tar.nemo"
    not_tar.write_bytes(b"\x00\x01 definitely not a tar archive" * 100)
    return [
        ("foreign _target_", _rewrite(tiny_nemo, tmp / "target.nemo", config_edit=foreign_target), "outside NeMo's ASR classes"),
        ("foreign model target", _rewrite(tiny_nemo, tmp / "model.nemo", config_edit=foreign_model), "outside NeMo's ASR classes"),
        ("absolute member", _rewrite(tiny_nemo, tmp / "abs.nemo", extra=[member("/etc/evil")]), "absolute path"),
        ("dot-dot member", _rewrite(tiny_nemo, tmp / "dotdot.nemo", extra=[member("../../evil")]), "'..'"),
        ("symlink member", _rewrite(tiny_nemo, tmp / "link.nemo", extra=[member("link", tarfile.SYMTYPE, None, "/etc/passwd")]), "is a link"),
        ("hard link member", _rewrite(tiny_nemo, tmp / "hard.nemo", extra=[member("hard", tarfile.LNKTYPE, None, "model_config.yaml")]), "is a link"),
        ("device member", _rewrite(tiny_nemo, tmp / "dev.nemo", extra=[member("dev", tarfile.CHRTYPE, None)]), "not a regular file"),
        ("truncated", truncated, "truncated or corrupt"),
        ("weights cut short", cut_weights, "truncated or corrupt"),
        ("not a tar", not_tar, "truncated or corrupt"),
        ("missing file", tmp / "nothing.nemo", "no such file"),
    ]


@pytest.mark.nemo
def test_hostile_nemo_refused_before_nemo_sees_it(tmp_path, capsys, tiny_nemo, monkeypatch):
    import nemo.collections.asr.models as asr_models

    def never(*args, **kwargs):
        raise AssertionError("NeMo was asked to restore a refused file")

    monkeypatch.setattr(asr_models.ASRModel, "restore_from", never)
    for label, path, fragment in hostile_cases(tiny_nemo, tmp_path):
        for argv in (("transcribe", path, SPEECH), ("compare", path, "--audio", SPEECH)):
            code, _, err = run_cli(capsys, *argv)
            assert code == EXIT_USAGE, f"{label}: exit {code}"
            assert_one_line_error(err, fragment)


def test_weights_are_read_without_unpickling_code(tmp_path):
    """The project's own checkpoint reads refuse pickled code (torch.load weights_only=True)."""
    torch = pytest.importorskip("torch")
    from streaming_parity.core.nemo_file import NemoArchive, UnsafeNemoFile, load_state_dict

    class Payload:
        def __reduce__(self):
            return (print, ("executed",))

    weights = io.BytesIO()
    torch.save({"w": Payload()}, weights)
    path = tmp_path / "evil.nemo"
    with tarfile.open(path, "w") as tar:
        for name, payload in (("model_config.yaml", b"target: nemo.collections.asr.models.X\nencoder: {}\n"),
                              ("model_weights.ckpt", weights.getvalue())):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    from streaming_parity.core.nemo_file import inspect_nemo

    archive = inspect_nemo(path)
    assert isinstance(archive, NemoArchive)
    with pytest.raises(UnsafeNemoFile, match="cannot be loaded safely"):
        load_state_dict(archive)


def test_unknown_fixture_and_bad_context(capsys):
    code, _, err = run_cli(capsys, "fixtures", "--model", "no-such-model")
    assert code == EXIT_USAGE
    assert_one_line_error(err, "unknown fixture model")


# -- exit codes: 2 for bad input only, 3 for anything else ----------------------------------------------

@pytest.mark.parametrize("error", [RuntimeError("boom in the harness"), KeyError("boom"), ValueError("boom"),
                                   FileNotFoundError("boom.json"), MemoryError()])
def test_a_bug_exits_3_with_one_line(capsys, monkeypatch, error):
    """A plain ValueError or KeyError used to be reported as bad input (exit 2), hiding the bug."""
    import streaming_parity.app.cli as cli

    def broken(args):
        raise error

    monkeypatch.setattr(cli, "cmd_fixtures", broken)
    code, _, err = run_cli(capsys, "fixtures", "--model", "tiny-streaming")
    assert code == cli.EXIT_INTERNAL == 3
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err
    assert lines[0].startswith(f"error: internal error: {type(error).__name__}")
    assert str(error).strip("'") in lines[0]


def test_debug_prints_the_traceback(capsys, monkeypatch):
    import streaming_parity.app.cli as cli

    def broken(args):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(cli, "cmd_fixtures", broken)
    code, _, err = run_cli(capsys, "--debug", "fixtures")
    assert code == 3
    assert "Traceback (most recent call last)" in err and "in broken" in err
    assert err.strip().splitlines()[-1] == "error: internal error: RuntimeError: boom second line"
    monkeypatch.undo()
    code, _, err = run_cli(capsys, "--debug", "fixtures", "--model", "no-such-model")
    assert code == EXIT_USAGE and "Traceback" in err  # bad input keeps exit 2, traceback on request
    assert err.strip().splitlines()[-1].startswith("error: unknown fixture model")


def test_bad_input_still_exits_2(tmp_path, capsys):
    from streaming_parity.judge.results import Results
    from streaming_parity.judge.tolerances import DEFAULT_TOLERANCES

    results = Results(model={"path": None, "sha256": None, "name": "m"}, tolerances="t").save(tmp_path / "r.json")
    typo = tmp_path / "typo.toml"
    typo.write_text('[float32."*".layrs]\nmax_abs = 1e-4\n')
    not_json = tmp_path / "not.json"
    not_json.write_text("{")
    wrong_json = tmp_path / "wrong.json"
    wrong_json.write_text('{"schema_version": 99}')
    for argv, fragment in [
        (("judge", results, "--tolerances", typo), '[float32."*".layrs]: unknown tap kind \'layrs\''),
        (("judge", results, "--tolerances", tmp_path / "absent.toml"), "tolerance file not found"),
        (("judge", tmp_path / "absent.json", "--tolerances", DEFAULT_TOLERANCES), "results file not found"),
        (("judge", not_json, "--tolerances", DEFAULT_TOLERANCES), "not valid JSON"),
        (("judge", wrong_json, "--tolerances", DEFAULT_TOLERANCES), "schema_version 99"),
        (("transcribe", "--backend", "no-such-backend", SPEECH), "unknown backend 'no-such-backend'"),
        (("fingerprint", tmp_path / "absent.nemo"), "no such file or directory"),
        (("fingerprint", tmp_path), "not a .nemo and not an artifact any registered backend reads"),
    ]:
        code, _, err = run_cli(capsys, *argv)
        assert code == EXIT_USAGE, (argv, err)
        assert_one_line_error(err, fragment)
        assert len(err.strip().splitlines()) == 1, err


def test_bad_lookahead_text_is_a_command_error():
    from streaming_parity.interface.commands import CommandError, parse_contexts

    assert parse_contexts(["70,13", "70,0"]) == [(70, 13), (70, 0)]
    with pytest.raises(CommandError, match="att context must look like 70,13"):
        parse_contexts(["70x13"])


def test_a_lookahead_the_model_lacks_is_bad_input():
    from streaming_parity.core.errors import BadInput
    from streaming_parity.interface.model_info import ModelInfo

    info = ModelInfo(num_layers=1, d_model=4, n_mels=80, conv_kernel_size=9, subsampling_factor=8,
                     att_context_sizes=((70, 13),), vocabulary=("a",), blank_id=1, pred_layers=1, pred_hidden=4,
                     max_symbols=10)
    with pytest.raises(BadInput, match=r"att_context_size \[70, 99\] is not one of the model's \[\[70, 13\]\]"):
        info.streaming_config((70, 99))


def test_the_project_input_errors_are_bad_input():
    """Every input-error type derives from BadInput (exit 2) and keeps the built-in type callers catch."""
    from streaming_parity.core.errors import (
        BadInput,
        InputNotFound,
        InvalidInput,
        UnknownName,
        UnsafeArtifact,
        Unsupported,
    )
    from streaming_parity.core.nemo_file import UnsafeNemoFile
    from streaming_parity.interface.audio import AudioError
    from streaming_parity.interface.commands import CommandError
    from streaming_parity.interface.speakers import SpeakerMaskError
    from streaming_parity.judge.tolerances import MissingToleranceError, ToleranceFileError

    expected = {CommandError: Exception, AudioError: ValueError, SpeakerMaskError: ValueError,
                UnsafeNemoFile: ValueError, UnsafeArtifact: ValueError, ToleranceFileError: ValueError,
                MissingToleranceError: ValueError, InvalidInput: ValueError, InputNotFound: FileNotFoundError,
                UnknownName: KeyError, Unsupported: NotImplementedError}
    for error_type, builtin in expected.items():
        assert issubclass(error_type, BadInput) and issubclass(error_type, builtin), error_type
    assert str(UnknownName("unknown backend 'x'")) == "unknown backend 'x'"  # not quoted as a KeyError is
    from streaming_parity.interface.types import ShapeMismatchError

    assert not issubclass(ShapeMismatchError, BadInput)  # a backend breaking the interface is a bug


def test_backend_input_errors_are_bad_input():
    from streaming_parity.core.errors import BadInput

    onnx_layout = pytest.importorskip("streaming_parity.backends.onnx.layout")
    for error_type in (onnx_layout.ExportDirError, onnx_layout.MissingGraphError, onnx_layout.SourceMismatchError,
                       onnx_layout.GraphInterfaceError):
        assert issubclass(error_type, BadInput), error_type
    from streaming_parity.backends.mlx.convert import ConversionError, VerificationFailed

    assert issubclass(ConversionError, BadInput)
    assert not issubclass(VerificationFailed, BadInput)  # a parity violation: exit 1
