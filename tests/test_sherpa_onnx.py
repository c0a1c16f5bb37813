"""sherpa-onnx's own runtime as a transcript-level backend, and the bisection of its stack.

On tiny-streaming: the runtime streams audio and records the tokens of every chunk; its front end is
kaldi-native-fbank configured as sherpa-onnx configures it (checked against the runtime's own frames);
the harness's driver on the same files, fed the runtime's features and windows, reproduces its tokens
exactly; ``parity compare`` bisects it. On the trained fixture: the finding of docs/peers.md.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from graph_metadata import set_metadata

sherpa_onnx = pytest.importorskip("sherpa_onnx", reason="sherpa-onnx is not installed (pip install '.[peers]')")
pytest.importorskip("kaldi_native_fbank", reason="kaldi-native-fbank is not installed (pip install '.[peers]')")
pytest.importorskip("onnxruntime")

from streaming_parity.core.errors import UnsafeArtifact  # noqa: E402
from streaming_parity.interface.decoding import decode_tokens  # noqa: E402

pytestmark = pytest.mark.sherpa_onnx

REPO = Path(__file__).resolve().parents[1]
CONTEXT = (70, 13)


@pytest.fixture(scope="session")
def sherpa_dir(backend_pool) -> Path:
    return backend_pool.source("sherpa-onnx")  # shared with the parity suites


@pytest.fixture(scope="session")
def runtime(backend_pool):
    return backend_pool.get("sherpa-onnx")


@pytest.fixture(scope="session")
def driver(sherpa_dir, tiny_nemo):
    """The harness's ONNX Runtime driver on the very same files (the registry says which backend reads them)."""
    from streaming_parity.app.peers import tensor_driver_for

    backend = tensor_driver_for(sherpa_dir, _Peer(), tiny_nemo)
    yield backend
    backend.close()


class _Peer:
    name, dtype = "sherpa-onnx", "float32"


@pytest.fixture(scope="session")
def short_utterances(utterances):
    return sorted(utterances, key=lambda u: len(u.audio))[:3]


def test_runtime_streams_audio_chunk_by_chunk(runtime, short_utterances):
    from streaming_parity.interface.registry import get

    assert get("sherpa-onnx").capabilities == runtime.capabilities
    assert runtime.capabilities.input == "audio" and not runtime.capabilities.tensor_level
    assert set(runtime.info.att_context_sizes) == {(70, 13), (70, 6), (70, 1), (70, 0)}
    for utterance in short_utterances:
        for context in ((70, 13), (70, 1)):
            steps = list(runtime.stream_audio(utterance.audio[None], context))
            mel = runtime.features(runtime.input_audio(utterance.audio[None], context))[0]
            assert len(steps) == len(runtime.own_chunks(mel, context)) > 0  # one step per window decoded
            tokens = [t for step in steps for t in step.tokens[0]]
            assert tokens and all(0 <= t < len(runtime.vocabulary) for t in tokens)
            assert steps[-1].state.decoder[0].tokens == tokens
            assert not steps[0].taps and steps[0].state.caches() == {}
            assert decode_tokens(runtime.info.vocabulary, tokens)


def test_front_end_is_the_runtimes_own(runtime, sherpa_dir, short_utterances):
    """kaldi-native-fbank as configured here gives exactly the frames the runtime computes."""
    lookahead = runtime.lookaheads[CONTEXT]
    recognizer = runtime._recognizer(CONTEXT)
    for utterance in short_utterances:
        stream = recognizer.create_stream()
        stream.accept_waveform(16000, utterance.audio)
        stream.input_finished()
        ours = runtime.features(utterance.audio[None])[0][0]
        frames = ours.shape[-1]
        assert frames == (len(utterance.audio) + 80) // 160  # kaldi's count with snip_edges false
        theirs = np.asarray(stream.get_frames(0, frames), np.float32).reshape(frames, -1).T
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)
    assert lookahead.window == 121 and lookahead.shift == 112


def test_harness_rebuilds_the_runtime_token_for_token(runtime, driver, short_utterances):
    """The runtime's features and windows through the harness's driver: the runtime's exact tokens."""
    from streaming_parity.judge.bisect import run_chunks

    for utterance in short_utterances:
        for context in ((70, 13), (70, 1)):
            theirs = [list(s.tokens[0]) for s in runtime.stream_audio(utterance.audio[None], context)]
            mel = runtime.features(runtime.input_audio(utterance.audio[None], context))[0]
            ours = run_chunks(driver, runtime.own_chunks(mel, context), context)
            assert ours == theirs, f"{utterance.name} {context}"


def test_bisection_on_the_tiny_fixture(nemo_backend, driver, runtime, short_utterances, tolerances):
    from streaming_parity.judge.bisect import bisect_peer

    bisection = bisect_peer(nemo_backend, driver, runtime, short_utterances[:2], CONTEXT, tolerances)
    assert bisection.export_passed is True and "the exported graphs are right" in bisection.export_summary
    assert bisection.reproduced
    by_swap = {(v.front_end, v.chunking): v for v in bisection.variants}
    assert by_swap[("reference", "reference")].token_error == 0.0  # the driver gives NeMo's tokens
    assert bisection.runtime_token_error > 0.0
    assert any("the first 9 frames (90 ms)" in fact for fact in bisection.chunking_facts)
    assert bisection.lead_in_ms == 90
    assert bisection.cause and json.dumps(bisection.to_dict())


def test_unsafe_sherpa_directories_are_refused(sherpa_dir, tmp_path):
    from streaming_parity.backends.sherpa_onnx.backend import SherpaOnnxBackend

    source = next(p for p in sorted(sherpa_dir.iterdir()) if p.is_dir())
    duplicate = shutil.copytree(source, tmp_path / "duplicate")
    lines = (duplicate / "tokens.txt").read_text(encoding="utf-8").splitlines()
    lines[7] = lines[7].rsplit(" ", 1)[0] + " 6"
    (duplicate / "tokens.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(UnsafeArtifact, match="id 6 appears twice"):
        SherpaOnnxBackend(duplicate)
    truncated = shutil.copytree(source, tmp_path / "truncated")
    data = truncated / "encoder.data"
    data.write_bytes(data.read_bytes()[:1000])
    with pytest.raises(UnsafeArtifact, match="lies past the end of 'encoder.data'"):
        SherpaOnnxBackend(truncated)


# The FastConformer script's versions: neither writes chunk_size_ms nor feat_dim (the first writes the
# literal "None" for normalize_type); sherpa-onnx's runtime reads neither key.
OLDER_SCRIPTS = ("fast-conformer-2024-05", "fast-conformer")


@pytest.fixture(scope="session")
def older_dirs(tiny_nemo, work_dir) -> dict[str, Path]:
    """[70,13] as each older version of sherpa-onnx's script writes it (cached where tests/test_peer_formats.py
    writes the same directories)."""
    from streaming_parity.backends.onnx.peer_export import SHERPA_SCRIPTS, export_peer_cached

    return {name: export_peer_cached(tiny_nemo, work_dir / "scripts", fmt="sherpa-onnx", att_context_sizes=[CONTEXT],
                                     int8=SHERPA_SCRIPTS[name].int8, script=name)
            for name in OLDER_SCRIPTS}


@pytest.mark.parametrize("script", OLDER_SCRIPTS)
def test_older_script_directory_runs_as_the_newest(script, older_dirs, runtime, tiny_nemo, nemo_backend,
                                                   short_utterances, tolerances):
    """A directory without chunk_size_ms: its lookahead comes from the graph (14 encoder frames per window,
    [70,13]); the runtime gives the newest script's directory's tokens step for step, the driver on the
    same files gives NeMo's tokens, and the bisection rebuilds the runtime token for token."""
    import onnx

    from streaming_parity.app.peers import tensor_driver_for
    from streaming_parity.backends.sherpa_onnx.backend import SherpaOnnxBackend
    from streaming_parity.judge.bisect import bisect_peer

    directory = older_dirs[script]
    metadata = {p.key for p in onnx.load(str(directory / "encoder.onnx"), load_external_data=False).metadata_props}
    assert not {"chunk_size_ms", "feat_dim"} & metadata
    older = SherpaOnnxBackend(directory, nemo_path=tiny_nemo)
    driver = tensor_driver_for(directory, _Peer(), tiny_nemo)
    try:
        assert older.info.att_context_sizes == (CONTEXT,)
        lookahead = older.lookaheads[CONTEXT]
        assert (lookahead.window, lookahead.shift, lookahead.frames) == (121, 112, 14)
        for utterance in short_utterances:
            ours = [list(s.tokens[0]) for s in older.stream_audio(utterance.audio[None], CONTEXT)]
            newest = [list(s.tokens[0]) for s in runtime.stream_audio(utterance.audio[None], CONTEXT)]
            assert ours == newest and any(ours), utterance.name
        bisection = bisect_peer(nemo_backend, driver, older, short_utterances[:2], CONTEXT, tolerances)
        assert bisection.export_passed is True and bisection.reproduced
        by_swap = {(v.front_end, v.chunking): v for v in bisection.variants}
        assert by_swap[("reference", "reference")].token_error == 0.0  # the files give NeMo's tokens
        assert bisection.lead_in_ms == 90
    finally:
        driver.close()
        older.close()


def test_older_script_directory_through_the_cli(tiny_nemo, older_dirs, tmp_path, capsys):
    """``--candidate sherpa-onnx:DIR`` takes the first FastConformer script's directory, as it takes the newest."""
    from streaming_parity.app.cli import main

    directory = older_dirs["fast-conformer-2024-05"]
    results = tmp_path / "results.json"
    code = main(["compare", str(tiny_nemo), "--candidate", f"sherpa-onnx:{directory}", "--audio",
                 str(REPO / "streaming_parity/fixtures/speech/utt02.wav"), "--att-context", "70,13", "--json", str(results)])
    captured = capsys.readouterr()
    assert code == 1, captured.err  # the runtime's first window, as with the newest script's directory
    assert f"candidate {directory}: sherpa-onnx, run by the sherpa-onnx backend" in captured.err
    assert "FAIL nemo~sherpa-onnx [70,13] utt02.wav: tokens leave the reference's at step" in captured.out
    saved = json.loads(results.read_text())
    assert saved["extra"]["peer_bisection"][0]["reproduced"] is True
    assert saved["extra"]["peer_bisection"][0]["export_passed"] is True


@pytest.mark.parametrize("edit, stated", [
    ({"chunk_size_ms": 560}, "chunk_size_ms = 560 contradicts the graph's 1120 (14 encoder frames per chunk x 8 x "
                             "10 ms)"),
    ({"feat_dim": 80}, "feat_dim = 80 contradicts the graph's feature dimension 128"),
    # A consistent description of [70,1] on the [70,13] graph: the graph, not the metadata, has the last word.
    ({"window_size": 25, "chunk_shift": 16, "chunk_size_ms": 160},
     "window_size = 25 contradicts the graph, whose chunk is longer: it returns 2 encoder frames for 25 mel frames "
     "and 3 for 33"),
    ({"chunk_shift": 104}, "chunk_shift = 104 contradicts the graph, which returns 14 encoder frames per chunk (14 x "
                           "subsampling_factor 8 = 112 mel frames)"),
    ({"drop": ("window_size",)}, "metadata key 'window_size' missing"),
    ({"cache_last_time_dim1": ""}, "metadata key 'cache_last_time_dim1' missing"),
    ({"cache_last_channel_dim3": 32}, "cache_last_channel_dim3 = 32 contradicts the graph's cache_last_channel axis "
                                      "3 = 64"),
])
def test_metadata_that_contradicts_the_graph_is_refused(sherpa_dir, tmp_path, edit, stated):
    """Without the .nemo, what the encoder's metadata states is held to the graph itself."""
    from streaming_parity.backends.sherpa_onnx.backend import SherpaOnnxBackend

    directory = shutil.copytree(sherpa_dir / "1120", tmp_path / "lying")
    set_metadata(directory / "encoder.onnx", **edit)
    with pytest.raises(UnsafeArtifact) as caught:
        SherpaOnnxBackend(directory)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{directory / 'encoder.onnx'}: ") and stated in message


@pytest.mark.parametrize("edit, stated", [
    ({"chunk_size_ms": 560}, "chunk_size_ms = 560 contradicts the graph's 1120"),
    ({"window_size": 112}, "window_size = 112 contradicts the .nemo's chunk_size + pre_encode_cache_size at [70, 13] "
                           "= 121"),
    ({"chunk_shift": 104}, "chunk_shift = 104 contradicts the .nemo's chunk_size (112 at [70, 13], 56 at [70, 6], 16 "
                           "at [70, 1], 8 at [70, 0])"),
    ({"cache_last_channel_dim2": 64}, "cache_last_channel_dim2 (left context) = 64 contradicts the .nemo's "
                                      "encoder.att_context_size left = 70"),
    ({"pred_hidden": 32}, "pred_hidden = 32 contradicts the .nemo's decoder.prednet.pred_hidden = 64"),
    ({"normalize_type": "per_feature"}, "normalize_type = 'per_feature' contradicts the .nemo's "
                                        "preprocessor.normalize = 'NA'"),
])
def test_metadata_that_contradicts_the_nemo_is_refused(sherpa_dir, tiny_nemo, tmp_path, edit, stated):
    from streaming_parity.backends.sherpa_onnx.backend import SherpaOnnxBackend

    directory = shutil.copytree(sherpa_dir / "1120", tmp_path / "lying")
    set_metadata(directory / "encoder.onnx", **edit)
    with pytest.raises(UnsafeArtifact) as caught:
        SherpaOnnxBackend(directory, nemo_path=tiny_nemo)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{directory / 'encoder.onnx'}: ") and stated in message


@pytest.mark.parametrize("spelling", ["None", "", "NA", None])
def test_each_spelling_of_no_normalisation_is_read(sherpa_dir, tiny_nemo, tmp_path, spelling):
    """The spellings the scripts write for the .nemo's "NA", and an absent key (the runtime reads it as "")."""
    from streaming_parity.backends.sherpa_onnx.backend import SherpaOnnxBackend

    directory = shutil.copytree(sherpa_dir / "1120", tmp_path / "normalize")
    if spelling is None:
        set_metadata(directory / "encoder.onnx", drop=("normalize_type",))
    else:
        set_metadata(directory / "encoder.onnx", normalize_type=spelling)
    backend = SherpaOnnxBackend(directory, nemo_path=tiny_nemo)
    assert backend.info.att_context_sizes == (CONTEXT,) and len(backend.notes()) == 1
    # Without the .nemo a normalisation is not a contradiction, but the runtime's streaming front end
    # ignores it, and the notes say so.
    set_metadata(directory / "encoder.onnx", normalize_type="per_feature")
    assert "normalize_type 'per_feature': sherpa-onnx's streaming front end does not apply it" in \
        SherpaOnnxBackend(directory).notes()[-1]


def test_parity_compare_detects_and_bisects(tiny_nemo, sherpa_dir, tmp_path, capsys):
    from streaming_parity.app.cli import main

    results = tmp_path / "results.json"
    code = main(["compare", str(tiny_nemo), "--candidate", f"sherpa-onnx:{sherpa_dir}", "--candidate", str(sherpa_dir),
                 "--audio", str(REPO / "streaming_parity/fixtures/speech/utt02.wav"), "--att-context", "70,13", "--json", str(results)])
    captured = capsys.readouterr()
    assert code == 1  # the runtime's tokens differ from NeMo's
    assert f"candidate {sherpa_dir}: sherpa-onnx, run by the onnx backend" in captured.err
    assert f"candidate {sherpa_dir}: sherpa-onnx, run by the sherpa-onnx backend" in captured.err
    assert "stack bisection of the peer runtime(s)" in captured.out and "cause: " in captured.out
    assert "FAIL nemo~sherpa-onnx [70,13] utt02.wav: tokens leave the reference's at step" in captured.out
    assert "FAIL nemo~onnx" not in captured.out  # the same files through the harness's driver pass
    saved = json.loads(results.read_text())
    assert saved["extra"]["peer_bisection"][0]["reproduced"] is True
    # Reported with its bisection, but a peer runtime does not gate a nightly's fp32 verdict.
    from streaming_parity.judge.results import Results
    from streaming_parity.report import overall_passed

    assert {c["gating"] for c in saved["comparisons"] if c["candidate"] == "sherpa-onnx"} == {False}
    assert overall_passed([Results.load(results)], fp32_only=True)
    assert not overall_passed([Results.load(results)])


def test_trained_fixture_finding():
    """docs/peers.md: on the trained fixture the runtime's chunking, not its export or front end, costs the WER."""
    from streaming_parity.fixtures.trained.evaluate import test_entries
    from streaming_parity.interface.registry import get
    from streaming_parity.interface.utterance import Utterance
    from streaming_parity.judge.bisect import bisect_peer
    from streaming_parity.judge.tolerances import Tolerances

    nemo = REPO / "streaming_parity/fixtures/trained/trained-streaming.nemo"
    directory = get("sherpa-onnx").prepare(nemo, REPO / ".cache/artifacts", att_context_sizes=[CONTEXT])
    utterances = [Utterance.from_file(e["audio_filepath"], e["text"]) for e in test_entries()[:40]]
    with get("nemo").load(nemo) as reference, get("onnx").load(directory, nemo_path=nemo) as driver, \
            get("sherpa-onnx").load(directory, nemo_path=nemo) as runtime:
        bisection = bisect_peer(reference, driver, runtime, utterances, CONTEXT, Tolerances.load())
    print("\n".join(bisection.lines()))
    assert bisection.export_passed and bisection.reproduced
    assert bisection.runtime_wer > bisection.reference_wer + 0.1
    assert bisection.cause.startswith("the chunking")
    assert bisection.lead_in_wer < bisection.reference_wer
