"""Hybrid RNNT-CTC models (``EncDecHybridRNNTCTCBPEModel``) in every backend, on the ``tiny-hybrid`` fixture.

The CTC head (``aux_ctc``, NeMo's ``ConvASRDecoder``) runs beside the transducer: its log-probabilities are
the ``ctc`` tap and its greedy transcript is recorded and judged beside the RNNT one. The fixture goes
through ``parity convert``, ``parity export-onnx``, ``parity compare --onnx --mlx``, ``parity verify --nemo``
and ``parity report`` at fp32 tolerances, every lookahead, on the two shortest fixture utterances.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
from builders import copy_dir, run_cli, step_output, stream_run, streaming_state

from streaming_parity.app.cli import EXIT_OK, EXIT_VIOLATION
from streaming_parity.fixtures.models import SPEECH_DIR
from streaming_parity.interface.decoding import ctc_greedy
from streaming_parity.interface.driver import StreamRun
from streaming_parity.interface.taps import TAP_CTC
from streaming_parity.judge.compare import compare_runs
from streaming_parity.judge.tolerances import Tolerances

pytestmark = [pytest.mark.nemo]
pytest.importorskip("nemo", reason="NeMo is not installed (pip install '.[nemo]')")

AUDIO = [SPEECH_DIR / "utt04.wav", SPEECH_DIR / "utt07.wav"]  # the two shortest fixture utterances
CONTEXTS = [(70, 13), (70, 6), (70, 1), (70, 0)]
CTC_WEIGHT = "ctc_decoder.decoder_layers.0.weight"


def _audio_args() -> list:
    return ["--audio", *AUDIO, *(a for c in CONTEXTS for a in ("--att-context", f"{c[0]},{c[1]}"))]


@pytest.fixture(scope="module")
def hybrid_nemo() -> Path:
    from streaming_parity.fixtures.models import build

    return build("tiny-hybrid", progress=lambda _m: None)


@pytest.fixture(scope="module")
def nemo(hybrid_nemo):
    from streaming_parity.interface.registry import get

    backend = get("nemo").load(hybrid_nemo)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hybrid")


@pytest.fixture(scope="module")
def utterances():
    from streaming_parity.interface.utterance import Utterance

    return [Utterance.from_file(path) for path in AUDIO]


# -- the model and its config ---------------------------------------------------------------------

def test_nemo_restores_the_hybrid_class_and_reads_its_ctc_head(hybrid_nemo, nemo):
    from streaming_parity.core.nemo_config import read_model_config
    from streaming_parity.core.nemo_file import inspect_nemo

    assert type(nemo.model).__name__ == "EncDecHybridRNNTCTCBPEModel"
    config = read_model_config(inspect_nemo(hybrid_nemo).config)
    assert config.decoder_kind == "rnnt+ctc" and config.kind == "rnnt"
    assert (config.ctc.feat_in, config.ctc.num_classes, config.ctc.output_size) == (64, 128, 129)
    assert config.ctc.vocabulary == config.joint.vocabulary and len(config.ctc.vocabulary) == 128
    assert nemo.info.ctc_head and TAP_CTC in nemo.produced_taps()
    # The capabilities a backend declares are model-independent (the registry's); per model, ``ctc``
    # is produced only with a CTC head.
    from dataclasses import replace

    from streaming_parity.interface.registry import get

    assert get("nemo").capabilities == nemo.capabilities and TAP_CTC in nemo.capabilities.taps
    assert TAP_CTC not in nemo.capabilities.for_model(replace(nemo.info, ctc_head=False)).taps


def test_ctc_config_defaults_and_reading():
    from streaming_parity.core.nemo_config import CtcConfig, read_model_config, stated_config
    from streaming_parity.fixtures.models import FIXTURES

    spec = read_model_config(FIXTURES["tiny-hybrid"].config("tokenizer"))
    # Before NeMo builds the model: feat_in from the encoder, num_classes (-1) and vocabulary ([]) unset.
    assert (spec.ctc.feat_in, spec.ctc.num_classes, spec.ctc.vocabulary) == (64, None, None)
    built = spec.with_vocabulary(["a", "b", "c"])
    assert (built.ctc.num_classes, built.ctc.vocabulary, built.ctc.output_size) == (3, ("a", "b", "c"), 4)
    assert read_model_config(FIXTURES["tiny-streaming"].config("tokenizer")).ctc is None
    assert read_model_config(FIXTURES["tiny-streaming"].config("tokenizer")).decoder_kind == "rnnt"
    assert CtcConfig.from_mapping({"feat_in": 32, "num_classes": 7}).output_size == 8
    stated = stated_config(FIXTURES["tiny-hybrid"].config("tokenizer"))
    assert stated.decoder_kind == "rnnt+ctc"
    assert not any(stated.ctc.values())  # feat_in null, num_classes -1 and vocabulary [] claim nothing
    assert stated_config({"encoder": {}}).ctc is None


def test_ctc_greedy_collapses_repeats_across_steps():
    blank = 3
    frames = np.eye(4)[[0, 0, 3, 0, 1, 1, 3, 3, 2]]  # labels a a _ a b b _ _ c
    whole, _ = ctc_greedy(frames, len(frames), blank, blank)
    assert whole == [0, 0, 1, 2]
    # Cut anywhere, with the last frame's label carried, the steps emit the same sequence.
    for cut in range(len(frames) + 1):
        first, last = ctc_greedy(frames[:cut], cut, blank, blank)
        second, _ = ctc_greedy(frames[cut:], len(frames) - cut, blank, last)
        assert first + second == whole, cut
    assert ctc_greedy(frames, 2, blank, 0) == ([], 0)  # a repeat of the previous step's last label


def test_nemo_ctc_tokens_are_nemos_ctc_decoding(nemo, utterances):
    """Step by step, the CTC transcript is what NeMo's own ``CTCDecoding`` greedy gives on the concatenated
    labels (as ``conformer_stream_step`` with the CTC decoder builds them); offline likewise."""
    import torch

    from streaming_parity.interface.driver import stream

    decode = nemo.model.ctc_decoding.ctc_decoder_predictions_tensor
    for utterance in utterances:
        mel, _ = nemo.features(utterance.audio[None])
        for context in CONTEXTS:
            run = stream(nemo, mel, context, "plain")
            labels = np.concatenate([step.taps[TAP_CTC][0].argmax(-1) for step in run.steps])
            assert len(labels) == run.encoded.shape[-1]
            (hypothesis,) = decode(torch.from_numpy(labels)[None], decoder_lengths=torch.tensor([len(labels)]))
            assert nemo.model.tokenizer.ids_to_text(run.ctc_tokens) == hypothesis.text, (utterance.name, context)
            assert run.ctc_tokens and run.steps[-1].state.ctc_last_label == [int(labels[-1])]
            offline = nemo.offline(mel, np.array([mel.shape[-1]]), context)
            labels = offline.taps[TAP_CTC][0].argmax(-1)
            (hypothesis,) = decode(torch.from_numpy(labels)[None], decoder_lengths=torch.tensor([len(labels)]))
            assert nemo.model.tokenizer.ids_to_text(offline.ctc_tokens[0]) == hypothesis.text


# -- the command line: transcribe, convert, export-onnx, compare, verify, report ----------------------

def test_transcribe_prints_the_rnnt_and_the_ctc_transcript(hybrid_nemo, nemo, utterances, capsys):
    """``parity transcribe`` on a hybrid model: one line per decoder, named, each the streamed run's own
    greedy transcript (the CTC one collapsed across steps)."""
    from streaming_parity.interface.decoding import decode_tokens
    from streaming_parity.interface.driver import shared_mode, stream

    cli = run_cli(capsys, "transcribe", hybrid_nemo, AUDIO[0], "--att-context", "70,13", "--att-context", "70,1")
    assert cli.code == EXIT_OK, cli.output
    lines = [line.split("\t") for line in cli.output.strip().splitlines()]
    assert [line[:3] for line in lines] == [[AUDIO[0].name, "[70,13]", "rnnt"], [AUDIO[0].name, "[70,13]", "ctc"],
                                           [AUDIO[0].name, "[70,1]", "rnnt"], [AUDIO[0].name, "[70,1]", "ctc"]]
    mel, _ = nemo.features(utterances[0].audio[None])
    for (_, context, decoder, text) in lines:
        run = stream(nemo, mel, tuple(int(c) for c in context.strip("[]").split(",")), shared_mode(nemo))
        tokens = run.tokens if decoder == "rnnt" else run.ctc_tokens
        assert tokens and text == decode_tokens(nemo.info.vocabulary, tokens), (context, decoder)


@pytest.fixture(scope="module")
def artifact(hybrid_nemo, work):
    pytest.importorskip("mlx.core", reason="mlx is not installed (pip install '.[mlx]')")
    return work / "mlx"


@pytest.fixture(scope="module")
def export(hybrid_nemo, work):
    pytest.importorskip("onnxruntime")
    return work / "onnx"


@pytest.mark.mlx
def test_convert_maps_and_verifies_the_ctc_head(hybrid_nemo, artifact, capsys):
    from streaming_parity.backends.mlx import mapping, tensors_as_source
    from streaming_parity.detect.diagnose import compare_tensors_to_source, source_state

    cli = run_cli(capsys, "convert", hybrid_nemo, "--out", artifact, *_audio_args())
    assert cli.code == EXIT_OK, cli.output
    report = json.loads((artifact / "parity.json").read_text())
    assert report["passed"] and set(report["worst_max_abs"]) == {f"{c[0]},{c[1]}" for c in CONTEXTS}
    for by_mode in report["worst_max_abs"].values():
        for worst in by_mode.values():  # plain streaming and offline, every lookahead
            assert worst[TAP_CTC] < 1e-4
    # The CTC head is a kernel-1 Conv1d in MLX layout, and maps back to the source exactly.
    assert mapping.match_source(CTC_WEIGHT).rule.layout is mapping.CONV1D_OKI
    restored = {name: array for name, sources, array, _ in tensors_as_source(artifact) for _ in sources}
    assert restored[CTC_WEIGHT].shape == (129, 64, 1)
    assert compare_tensors_to_source(tensors_as_source(artifact), source_state(hybrid_nemo)) == []


@pytest.mark.onnx
def test_export_onnx_writes_the_ctc_graph(hybrid_nemo, export, capsys):
    from streaming_parity.backends.onnx.layout import CTC_INPUTS, CTC_OUTPUTS, ctc_file, read_graph_metadata

    cli = run_cli(capsys, "export-onnx", hybrid_nemo, "--out", export, "--int8")
    assert cli.code == EXIT_OK, cli.output
    metadata = read_graph_metadata(export / ctc_file())
    assert metadata["graph"] == "ctc" and metadata["ctc_head"] == {"file": "ctc.onnx", "num_classes": 128,
                                                                    "feat_in": 64}
    import onnx

    graph = onnx.load(str(export / ctc_file()))
    assert [i.name for i in graph.graph.input] == list(CTC_INPUTS)
    assert [o.name for o in graph.graph.output] == list(CTC_OUTPUTS)
    assert CTC_WEIGHT in {init.name for init in graph.graph.initializer}
    assert not any(p.name.startswith("ctc") for p in export.glob("*.int8.onnx"))  # one fp32 head serves int8


@pytest.mark.onnx
@pytest.mark.mlx
def test_compare_nemo_onnx_mlx_judges_ctc_taps_and_transcripts(hybrid_nemo, export, artifact, work, capsys):
    from streaming_parity.judge.results import Results

    results = work / "results.json"
    cli = run_cli(capsys, "compare", hybrid_nemo, "--onnx", export, "--mlx", artifact, *_audio_args(),
                  "--json", results)
    assert cli.code == EXIT_OK, cli.output
    saved = Results.load(results)
    pairs = {}
    for comparison in saved.comparisons:
        pairs.setdefault(comparison.pair.split("@")[0], []).append(comparison)
    assert {"nemo~onnx", "nemo~mlx", "streaming~offline"} <= set(pairs)
    worst: dict[tuple[str, tuple[int, int]], dict[str, float]] = {}
    for pair in ("nemo~onnx", "nemo~mlx"):
        assert len(pairs[pair]) == len(AUDIO) * len(CONTEXTS)
        for comparison in pairs[pair]:
            assert comparison.passed, comparison.describe_failure()
            steps = {t.step for t in comparison.taps if t.tap == "encoder" and t.step >= 0}
            ctc_steps = {t.step for t in comparison.taps if t.tap == TAP_CTC}
            assert steps and ctc_steps == steps, f"{pair}: the ctc tap is not compared at every step"
            assert comparison.ctc_compared and comparison.reference_ctc_tokens
            assert comparison.reference_ctc_tokens == comparison.candidate_ctc_tokens  # identical at fp32
            metrics = worst.setdefault((pair, comparison.att_context_size), {})
            for tap in (t for t in comparison.taps if t.tap == TAP_CTC):
                for name in ("max_abs", "max_abs_scaled", "rel_l2"):
                    metrics[name] = max(metrics.get(name, 0.0), tap.metrics[name])
    for (pair, context), metrics in sorted(worst.items()):
        print(f"{pair} {list(context)} ctc: " + ", ".join(f"{k} {v:.1e}" for k, v in metrics.items()))
    # A CTC transcript row beside each RNNT one, per backend, mode, utterance and lookahead.
    decoders = {(row["backend"], row["mode"], row.get("decoder")) for row in saved.transcripts}
    # Every backend streams NeMo's default first chunk (plain), the ONNX export through its first-chunk graph.
    for backend in ("nemo", "onnx", "mlx"):
        assert {(backend, "plain", "rnnt"), (backend, "plain", "ctc")} <= decoders
    ctc_rows = [row for row in saved.transcripts if row["decoder"] == "ctc"]
    assert len(ctc_rows) == len(AUDIO) * len(CONTEXTS) * 3 and all(row["tokens"] for row in ctc_rows)


@pytest.mark.onnx
@pytest.mark.mlx
def test_report_shows_the_ctc_transcripts(export, artifact, work, capsys):
    from streaming_parity.judge.results import Results
    from streaming_parity.report.data import transcript_groups, wer_rows

    results = work / "results.json"
    if not results.exists():
        pytest.skip("needs the compare test's results")
    cli = run_cli(capsys, "report", results, "--out", work / "report")
    assert cli.code == EXIT_OK, cli.output
    html = (work / "report" / "report.html").read_text()
    assert "(CTC head)" in html and "mlx (CTC)" in html
    loaded = Results.load(results)
    groups = transcript_groups([loaded])
    assert {g.decoder for g in groups} == {"rnnt", "ctc"}
    for group in groups:
        assert all(c.same_as_nemo for u in group.utterances for c in u.candidates), group
    assert {(r.backend, r.decoder) for r in wer_rows([loaded])} >= {("onnx", "ctc"), ("mlx", "ctc"), ("nemo", "ctc")}
    assert all(r.wer_vs_nemo == 0.0 for r in wer_rows([loaded]) if r.backend != "nemo")


@pytest.mark.mlx
def test_verify_passes_and_finds_a_corrupted_ctc_head(hybrid_nemo, artifact, work, capsys):
    import mlx.core as mx

    cli = run_cli(capsys, "verify", artifact, "--nemo", hybrid_nemo, *_audio_args())
    assert cli.code == EXIT_OK, cli.output
    assert "ctc head worst max_abs: plain" in cli.output  # the CTC head's line under each verification table
    corrupted = copy_dir(artifact, work / "mlx-corrupted")
    path = corrupted / "model.safetensors"
    weights = dict(mx.load(str(path)))
    weights[CTC_WEIGHT] = weights[CTC_WEIGHT] * 1.01
    mx.save_safetensors(str(path), weights)
    cli = run_cli(capsys, "verify", corrupted, "--nemo", hybrid_nemo, "--audio", AUDIO[0], "--att-context", "70,13")
    assert cli.code == EXIT_VIOLATION
    assert f"tensor {CTC_WEIGHT} differs" in cli.output and "tap ctc" in cli.output
    assert f"most likely responsible: {CTC_WEIGHT}" in cli.output


# -- the ONNX int8 variant, spooled runs ---------------------------------------------------------------

@pytest.mark.onnx
def test_int8_ctc_within_its_table(hybrid_nemo, export, nemo, utterances):
    from streaming_parity.interface.driver import stream
    from streaming_parity.interface.registry import get

    if not (export / "encoder-70_13.int8.onnx").exists():
        pytest.skip("needs the export test's graphs")
    int8 = get("onnx").load(export, dtype="int8")
    tolerances = Tolerances.load()
    for utterance in utterances:
        mel, _ = nemo.features(utterance.audio[None])
        for context in CONTEXTS:
            comparison = compare_runs(stream(nemo, mel, context, "pad-and-drop"),
                                      stream(int8, mel, context, "pad-and-drop", dtype="int8"), tolerances,
                                      num_layers=nemo.info.num_layers, utterance=utterance.name)
            ctc = [t for t in comparison.taps if t.tap == TAP_CTC]
            assert ctc and all(t.passed for t in ctc), [t.violations for t in ctc if not t.passed]
            assert comparison.candidate_ctc_tokens is not None


def test_spooled_runs_keep_the_ctc_transcript(nemo, utterances, tmp_path):
    from streaming_parity.interface.driver import stream
    from streaming_parity.judge.spool import record

    mel, _ = nemo.features(utterances[0].audio[None])
    memory = stream(nemo, mel, (70, 1), "plain")
    spooled = record(nemo, mel, (70, 1), "plain", tmp_path / "run")
    assert spooled.ctc_tokens == memory.ctc_tokens and spooled.ctc_tokens
    assert spooled.steps[-1].ctc_tokens == memory.steps[-1].ctc_tokens
    assert spooled.steps[-1].state.ctc_last_label == memory.steps[-1].state.ctc_last_label
    assert compare_runs(memory, spooled, Tolerances.load(), num_layers=nemo.info.num_layers).passed


# -- the tie rule on CTC frames, and saved results ----------------------------------------------------

def _ctc_run(backend: str, rows_per_step: list[np.ndarray], blank: int) -> StreamRun:
    """A run of CTC log-probabilities alone at (70, 0), one ``[T, V+1]`` array per step, each step's greedy
    labels and last label carried on."""
    steps, last = [], blank
    for rows in rows_per_step:
        emitted, last = ctc_greedy(rows, len(rows), blank, last)
        steps.append(step_output({TAP_CTC: rows[None]}, ctc_tokens=emitted, encoded=np.zeros((1, 1, len(rows))),
                                 state=streaming_state((70, 0), caches=True, ctc_last_label=[last])))
    return stream_run(backend, steps, context=(70, 0))


def test_a_ctc_flip_at_a_near_tie_passes_and_a_real_one_fails():
    from streaming_parity.judge.compare import rejudge
    from streaming_parity.judge.results import comparison_from_dict, comparison_to_dict

    tolerances = Tolerances.load()
    blank = 3
    # Step 1, frame 0: label 1 leads the blank by 5e-7 (2.5e-7 of the step's range, 2.0), within twice the
    # allowed error per log-probability (max_abs_scaled 5e-6): a near-tie.
    reference = [np.array([[-0.5, -2.0, -2.0, -1.5], [-2.0, -2.0, -2.0, -0.3]]),
                 np.array([[-2.0, -0.7, -2.0, -0.7000005], [-2.0, -2.0, -0.4, -1.5]])]
    candidate = [r.copy() for r in reference]
    candidate[1][0, [1, 3]] = candidate[1][0, [3, 1]]  # the top two exchanged: the blank wins there
    near = compare_runs(_ctc_run("nemo", reference, blank), _ctc_run("onnx", candidate, blank), tolerances,
                        num_layers=1)
    assert near.reference_ctc_tokens == [0, 1, 2] and near.candidate_ctc_tokens == [0, 2]
    assert [(f.step, f.call, f.near_tie, f.tap) for f in near.ctc_flips] == [(1, 0, True, TAP_CTC)]
    assert near.passed, near.describe_failure()

    # The same exchange where the reference was sure: a real disagreement.
    sure = [r.copy() for r in reference]
    sure[1][0, 3] = -1.5
    swapped = [r.copy() for r in sure]
    swapped[1][0, [1, 3]] = swapped[1][0, [3, 1]]
    real = compare_runs(_ctc_run("nemo", sure, blank), _ctc_run("onnx", swapped, blank), tolerances, num_layers=1)
    assert [f.near_tie for f in real.ctc_flips] == [False] and not real.passed
    assert "first divergent tap ctc at step 1" in real.describe_failure()

    # Saved and re-judged, the CTC transcripts and flips are kept and judged again.
    restored = comparison_from_dict(comparison_to_dict(near))
    assert restored.candidate_ctc_tokens == near.candidate_ctc_tokens and restored.ctc_flips == near.ctc_flips
    assert rejudge(restored, tolerances).passed
    table = copy.deepcopy(tolerances.table)
    table["float32"]["*"][TAP_CTC] = {"max_abs_scaled": 1e-8, "argmax_agreement": 1.0}
    strict = Tolerances(table)
    rejudged = rejudge(restored, strict)
    assert not rejudged.passed and not rejudged.ctc_flips[0].near_tie


# -- fingerprint: the decoder kind and contradictions ------------------------------------------------

def test_fingerprint_names_rnnt_ctc_in_every_format(hybrid_nemo, export, artifact, capsys):
    from streaming_parity.app.diagnose_path import artifact_readers
    from streaming_parity.detect.fingerprint import fingerprint

    report = fingerprint(hybrid_nemo, artifact_readers())
    assert report["weights"]["decoder_kind"] == report["config"]["decoder_kind"] == "rnnt+ctc"
    assert report["weights"]["ctc_output_width"] == 129 and not report["contradictions"]
    for path in (artifact, export):
        if not path.exists():
            continue
        report = fingerprint(path, artifact_readers())
        assert report["weights"]["ctc_head"] and not report["contradictions"], report["contradictions"]
        if path == artifact:
            assert report["weights"]["decoder_kind"] == "rnnt+ctc"


def test_fingerprint_contradicts_a_claimed_ctc_head_the_weights_lack(hybrid_nemo, tiny_nemo, tmp_path):
    import io
    import tarfile

    import yaml

    from streaming_parity.detect.fingerprint import contradictions, view_nemo
    from streaming_parity.fixtures.models import rewrite_checkpoint

    stripped = rewrite_checkpoint(hybrid_nemo, tmp_path / "stripped.nemo",
                                  lambda state: {k: v for k, v in state.items() if not k.startswith("ctc_decoder.")})
    found = contradictions(view_nemo(stripped))
    assert any("weights hold no CTC head" in c for c in found), found

    narrowed = rewrite_checkpoint(hybrid_nemo, tmp_path / "narrowed.nemo", lambda state: {
        **state, CTC_WEIGHT: state[CTC_WEIGHT][:-1], "ctc_decoder.decoder_layers.0.bias":
            state["ctc_decoder.decoder_layers.0.bias"][:-1]})
    found = contradictions(view_nemo(narrowed))
    assert any("the CTC head outputs 128 values" in c for c in found), found

    # A transducer checkpoint under a hybrid config: the same sentence as for the stripped weights.
    relabeled = tmp_path / "relabeled.nemo"
    with tarfile.open(tiny_nemo) as source, tarfile.open(relabeled, "w") as target:
        for info in source.getmembers():
            data = source.extractfile(info).read() if info.isfile() else None
            if info.name.lstrip("./") == "model_config.yaml":
                config = yaml.safe_load(data)
                config["aux_ctc"] = {"decoder": {"feat_in": 64, "num_classes": 128}}
                data = yaml.safe_dump(config).encode()
                info.size = len(data)
            target.addfile(info, io.BytesIO(data) if data is not None else None)
    found = contradictions(view_nemo(relabeled))
    assert any("transducer-only weights under a hybrid config" in c for c in found), found
