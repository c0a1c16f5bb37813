"""Reference recordings: the reference streamed once and judged against anywhere (streaming_parity.judge.recording).

The recording must be lossless (every tap, cache and decoder state of every step, bit for bit), give the
results of the live reference, refuse what cannot be trusted with one line, and judge an artifact where
neither torch nor NeMo can be imported.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from builders import BLOCK, torch_free_cli
from hypothesis import given, settings
from hypothesis import strategies as st

from streaming_parity.judge.recording import (
    MANIFEST,
    SCHEMA,
    Recording,
    RecordingError,
    apply_delta,
    cache_delta,
)

ROOT = Path(__file__).resolve().parents[1]
SPEECH = ROOT / "streaming_parity" / "fixtures" / "speech"
CONTEXTS = [(70, 13), (70, 0)]


# -- caches as shift + new frames -----------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(size=st.integers(1, 12), shift=st.integers(0, 12), axis=st.integers(0, 2), seed=st.integers(0, 2 ** 16))
def test_a_shifted_cache_is_rebuilt_bit_for_bit(size, shift, axis, seed):
    shift = min(shift, size)
    rng = np.random.default_rng(seed)
    shape = [2, 3, 4]
    shape[axis] = size
    previous = rng.standard_normal(shape).astype(np.float32)
    new = rng.standard_normal([*shape[:axis], shift, *shape[axis + 1:]]).astype(np.float32)
    current = np.concatenate([np.take(previous, range(shift, size), axis=axis), new], axis=axis)
    found = cache_delta(previous, current, axis, hint=shift)
    assert found is not None
    assert np.array_equal(apply_delta(previous, found[0], found[1], axis), current)


def test_a_cache_no_shift_explains_is_all_new_and_a_foreign_one_is_stored_whole():
    previous = np.arange(12, dtype=np.float32).reshape(1, 1, 12)
    current = previous + 100
    assert cache_delta(previous, current, axis=2)[0] == 12  # every frame new: still rebuilt exactly
    assert cache_delta(None, current, axis=2) is None  # the first step
    assert cache_delta(previous.astype(np.float64), current, axis=2) is None
    assert cache_delta(previous[..., :6], current, axis=2) is None


def test_nan_frames_are_kept_as_they_are():
    previous = np.array([[[1.0, np.nan, 3.0]]], np.float32)
    current = np.array([[[np.nan, 3.0, 7.0]]], np.float32)
    shift, new = cache_delta(previous, current, axis=2)
    assert shift == 1 and np.array_equal(apply_delta(previous, shift, new, 2), current, equal_nan=True)


# -- a recording of the tiny fixture --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def short_utterances():
    from streaming_parity.interface.utterance import Utterance

    return [Utterance.from_file(SPEECH / name) for name in ("utt04.wav", "utt07.wav")]


@pytest.fixture(scope="module")
def recording_dir(nemo_backend, tiny_nemo, short_utterances, tmp_path_factory) -> Path:
    from streaming_parity.app.source_provenance import record_reference

    return record_reference(nemo_backend, tiny_nemo, short_utterances, CONTEXTS,
                            tmp_path_factory.mktemp("recording") / "ref")


@pytest.mark.nemo
def test_every_step_reads_back_bit_for_bit(recording_dir, nemo_backend, short_utterances):
    from streaming_parity.interface.driver import stream

    recording = Recording(recording_dir)
    assert recording.info == nemo_backend.info
    for utterance in short_utterances:
        mel, _ = nemo_backend.features(utterance.audio[None])
        assert np.array_equal(recording.mel(utterance.name), mel)
        for context in CONTEXTS:
            for mode in ("plain", "pad-and-drop"):
                live = stream(nemo_backend, mel, context, mode)
                recorded = recording.run(utterance.name, context, mode)
                assert len(recorded.steps) == len(live.steps) and recorded.tokens == live.tokens
                for index, (ours, theirs) in enumerate(zip(recorded.steps, live.steps, strict=True)):
                    assert list(ours.taps) == list(theirs.taps), index
                    for name, value in {**theirs.taps, **theirs.state.caches()}.items():
                        got = {**ours.taps, **ours.state.caches()}[name]
                        assert got.dtype == value.dtype and np.array_equal(got, value), (context, mode, index, name)
                    for a, b in zip(ours.state.decoder, theirs.state.decoder, strict=True):
                        assert a.last_token == b.last_token and np.array_equal(a.h, b.h) and np.array_equal(a.c, b.c)
                assert np.array_equal(recorded.encoded, live.encoded)
    # The caches are stored as the frames that entered, not whole, wherever a shift rebuilds them.
    shifts = [step["cache_shift"]["cache_last_channel"] for run in recording.manifest["runs"] for step in run["steps"]]
    assert sum(shift is not None for shift in shifts) > len(shifts) // 2
    # NeMo's encoder output is its last layer's, transposed: stored once (and the step's encoded output with it).
    steps = [step for run in recording.manifest["runs"] for step in run["steps"]]
    last = f"layers.{nemo_backend.info.num_layers - 1}"
    assert all(step["derived_taps"]["encoder"][0] == last and step["encoded_is_encoder_tap"] for step in steps)
    assert all(o["derived_taps"]["encoder"][0] == last for o in recording.manifest["offline"])
    # A decoder state that no label changed is the step before's, stored once and read back above.
    assert any(d["as_before"] for step in steps for d in step["decoder"])


@pytest.mark.nemo
def test_the_offline_forward_reads_back_bit_for_bit_from_its_residuals(recording_dir, nemo_backend,
                                                                       short_utterances, tmp_path):
    """The offline forward's layer taps are stored as residuals from the plain-mode run at their lookahead: they
    read back as NeMo computes them, bit for bit, and the residuals are stored in less than the taps were."""
    from safetensors import safe_open

    from streaming_parity.core.packed_tensors import save_packed

    recording = Recording(recording_dir)
    for utterance in short_utterances:
        mel = recording.mel(utterance.name)
        for context in CONTEXTS:
            live = nemo_backend.offline(mel, np.array([mel.shape[-1]]), context)
            recorded = recording.offline(utterance.name, context)
            assert list(recorded.taps) == list(live.taps) and recorded.tokens == live.tokens
            for name, value in live.taps.items():
                assert recorded.taps[name].dtype == value.dtype, name
                assert recorded.taps[name].tobytes() == value.tobytes(), (utterance.name, context, name)
            assert np.array_equal(recorded.encoded, live.encoded)
    for entry in recording.manifest["offline"]:
        run = recording.manifest["runs"][entry["residual_taps"]["run"]]
        assert (run["utterance"], run["context"], run["mode"]) == (entry["utterance"], entry["context"], "plain")
        layers = [f"layers.{i}" for i in range(nemo_backend.info.num_layers)]
        assert entry["residual_taps"]["taps"] == layers
        taps = recording.offline(entry["utterance"], entry["context"], entry["length"]).taps
        save_packed(tmp_path / "as-taps.safetensors", {name: taps[name] for name in layers})
        with safe_open(str(recording_dir / entry["shard"]), framework="numpy") as residuals, \
                safe_open(str(tmp_path / "as-taps.safetensors"), framework="numpy") as as_taps:
            for name in layers:
                residual, tap = residuals.get_tensor(f"residual/tap/{name}").nbytes, as_taps.get_tensor(name).nbytes
                assert residual < tap, (entry["shard"], name, residual, tap)


@pytest.mark.nemo
@pytest.mark.mlx
def test_a_recorded_reference_gives_the_live_results(recording_dir, nemo_backend, backend_pool, short_utterances,
                                                     tolerances):
    """Verdicts, metrics, ties, transcripts and the order of everything are those of the live reference; only the
    provenance and the timings (measured when recorded) differ."""
    from streaming_parity.app.session import compare_backends

    candidate = backend_pool.get("mlx")
    live = compare_backends(nemo_backend, [candidate], short_utterances, CONTEXTS, tolerances).results.to_dict()
    recorded = compare_backends(Recording(recording_dir), [candidate], short_utterances, CONTEXTS,
                                tolerances).results.to_dict()
    for results in (live, recorded):
        for key in ("created", "model", "environment"):
            results.pop(key)
        for timing in results["timings"]:
            timing.pop("step_seconds")
    assert recorded["comparisons"] and recorded == live


@pytest.mark.nemo
@pytest.mark.mlx
def test_a_run_judged_lets_its_shards_go_and_reads_again_the_same(recording_dir, backend_pool, short_utterances,
                                                                  tolerances):
    """Shards are memory-mapped: a run left open after its comparison keeps every page read of it resident, and a
    night's runs are 1 GB at full size. Each is let go once judged, and reads again, bit for bit, when asked."""
    from streaming_parity.app.session import compare_backends

    recording = Recording(recording_dir)
    outcome = compare_backends(recording, [backend_pool.get("mlx")], short_utterances, CONTEXTS, tolerances)
    runs = list(outcome.reference.runs.values())
    assert runs and all(shard._reader is None for run in runs for shard in run.shards)
    run = runs[0]
    again = recording.run(run.entry["utterance"], run.att_context_size, run.mode)
    for index in range(len(again.steps)):
        ours, theirs = run.steps[index], again.steps[index]
        for name, value in {**theirs.taps, **theirs.state.caches()}.items():
            assert np.array_equal({**ours.taps, **ours.state.caches()}[name], value), (index, name)


# -- a recording is untrusted input ---------------------------------------------------------------------------

def _copy(recording_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(recording_dir, tmp_path / "copy"))


@pytest.mark.nemo
def test_a_tampered_shard_is_refused_with_one_line(recording_dir, tmp_path, capsys):
    from streaming_parity.app.cli import main

    tampered = _copy(recording_dir, tmp_path)
    shard = tampered / "run-0000-000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(RecordingError, match="sha256 differs"):
        Recording(tampered)
    assert main(["compare", "--reference", str(tampered)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "run-0000-000.safetensors: sha256 differs" in err[0]

    shard.write_bytes(bytes(data[:-10]))
    with pytest.raises(RecordingError, match="bytes, the manifest declares"):
        Recording(tampered)


@pytest.mark.nemo
def test_a_newer_schema_a_missing_shard_and_another_plan_are_refused(recording_dir, tmp_path):
    copy = _copy(recording_dir, tmp_path)
    manifest = json.loads((copy / MANIFEST).read_text())
    (copy / MANIFEST).write_text(json.dumps({**manifest, "schema": SCHEMA + 1}))
    with pytest.raises(RecordingError, match=f"schema {SCHEMA + 1} is newer"):
        Recording(copy)
    (copy / MANIFEST).write_text(json.dumps(manifest))
    (copy / "offline-0000.safetensors").unlink()
    with pytest.raises(RecordingError, match="offline-0000.safetensors is missing"):
        Recording(copy)

    shutil.copy(recording_dir / "offline-0000.safetensors", copy)
    manifest["offline"][0]["residual_taps"]["run"] = len(manifest["runs"])
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(RecordingError, match=f"residual taps of run {len(manifest['runs'])}; the recording has"):
        Recording(copy).offline(manifest["offline"][0]["utterance"], manifest["offline"][0]["context"])

    recording = Recording(recording_dir)
    with pytest.raises(RecordingError, match=r"\[70,6\] in plain mode was not recorded"):
        recording.run("utt04.wav", (70, 6), "plain")
    with pytest.raises(RecordingError, match="no lookahead"):
        recording.streaming_config((70, 6))


@pytest.mark.nemo
@pytest.mark.mlx
def test_another_checkpoint_or_chunk_plan_is_refused(recording_dir, backend_pool, tmp_path, capsys):
    from streaming_parity.app.cli import main
    from streaming_parity.fixtures.models import build

    artifact = backend_pool.source("mlx")
    other = build("tiny-hybrid", progress=lambda _m: None)
    assert main(["compare", str(other), "--reference", str(recording_dir), "--mlx", str(artifact)]) == 2
    assert "not from tiny-hybrid.nemo" in capsys.readouterr().err

    copy = _copy(recording_dir, tmp_path)
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["plan"]["streaming_configs"]["70,13"]["chunk_size"] = [17, 24]
    (copy / MANIFEST).write_text(json.dumps(manifest))
    assert main(["compare", "--reference", str(copy), "--mlx", str(artifact), "--att-context", "70,13"]) == 2
    assert "runs another chunk plan at [70,13]" in capsys.readouterr().err


# -- without torch and NeMo -----------------------------------------------------------------------------------

@pytest.mark.nemo
@pytest.mark.mlx
def test_an_artifact_is_judged_against_a_recording_without_torch_or_nemo(recording_dir, backend_pool, tmp_path):
    from streaming_parity.backends.mlx.mutations import by_name

    artifact = backend_pool.source("mlx")
    passed = torch_free_cli("compare", "--reference", str(recording_dir), "--mlx", str(artifact), "--att-context", "70,13")
    assert passed.returncode == 0, passed.stderr[-3000:]
    assert "nemo~mlx" in passed.stdout

    mutated = Path(shutil.copytree(artifact, tmp_path / "mutated"))
    mutation = by_name("transposed-linear")
    mutation.apply(mutated, {})
    failed = torch_free_cli("compare", "--reference", str(recording_dir), "--mlx", str(mutated), "--att-context", "70,13")
    assert failed.returncode == 1, failed.stderr[-3000:]
    assert f"first divergent tap {mutation.expect_tap} " in failed.stdout


@pytest.mark.nemo
@pytest.mark.mlx
def test_the_mlx_suites_run_against_a_recording_without_torch_or_nemo(nemo_backend, tiny_nemo, utterances,
                                                                      backend_pool, tmp_path):
    """``pytest -m mlx --parity-reference REF --parity-artifact mlx=DIR`` in a process where torch and NeMo cannot be
    imported: the MLX suites run against the recording, and none skips for want of NeMo."""
    from streaming_parity.app.source_provenance import record_reference

    recording = record_reference(nemo_backend, tiny_nemo, utterances, [(70, 13)], tmp_path / "ref")
    blocked = BLOCK.replace("from streaming_parity.app.cli import main\ncode = main(sys.argv[1:])",
                            "import pytest\ncode = pytest.main(sys.argv[1:])")
    result = subprocess.run(
        [sys.executable, "-c", blocked, "-q", "-p", "no:cacheprovider", "-m", "mlx", "-rs", "tests/test_mlx.py",
         "tests/test_parity_suites.py", "--parity-reference", str(recording),
         "--parity-artifact", f"mlx={backend_pool.source('mlx')}"],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout
    skipped = [line for line in result.stdout.splitlines() if line.startswith("SKIPPED")]
    for_want_of_nemo = ("NeMo is not installed", "needs the .nemo itself", "needs torch", "backend not installed: nemo")
    # Another backend that itself runs on torch (transformers) is rightly not installed without it.
    other_backend = re.compile(r"backend not installed: (?!nemo\b)[\w-]+ needs")
    assert not [line for line in skipped if any(reason in line for reason in for_want_of_nemo)
                and not other_backend.search(line)], skipped


@pytest.mark.nemo
def test_a_run_written_in_parts_reads_back_as_one(nemo_backend, tiny_nemo, short_utterances, tmp_path, monkeypatch):
    """Recording holds one part of a run in memory, not the run: the parts read back as the run, step by step."""
    from streaming_parity.app.source_provenance import record_reference
    from streaming_parity.interface.driver import stream
    from streaming_parity.judge import recording as recording_module

    monkeypatch.setattr(recording_module, "RUN_PART_BYTES", 1)  # every step its own part
    utterance = short_utterances[0]
    recorded = Recording(record_reference(nemo_backend, tiny_nemo, [utterance], [(70, 0)], tmp_path / "ref",
                                          modes=["plain"], offline=False))
    [entry] = recorded.manifest["runs"]
    assert len(entry["shards"]) == len(entry["steps"]) > 2 and entry["shard_starts"] == list(range(len(entry["steps"])))
    mel, _ = nemo_backend.features(utterance.audio[None])
    live = stream(nemo_backend, mel, (70, 0), "plain")
    run = recorded.run(utterance.name, (70, 0), "plain")
    for index in (0, len(live.steps) - 1, 1):  # out of order too: a part is found by its first step
        ours, theirs = run.steps[index], live.steps[index]
        for name, value in {**theirs.taps, **theirs.state.caches()}.items():
            assert np.array_equal({**ours.taps, **ours.state.caches()}[name], value), (index, name)
        # A part's pages stay resident while it is open: the part left behind is let go.
        assert sum(shard._reader is not None for shard in run.shards) == 1
