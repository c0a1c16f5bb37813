"""The prompt-conditioned family (Nemotron-3.5 ASR streaming, ``EncDecRNNTBPEModelWithPrompt``) in the ONNX
backend, on the ``tiny-prompt`` fixture.

The export adds ``prompt.onnx`` (NeMo's ``_apply_prompt_to_encoded`` on the encoder graph's output, the
locale's one-hot column built from a ``prompt_index`` input) and writes ``num_prompts`` and
``prompt_dictionary`` into every graph's metadata; the runtime maps a stream's locale through that copy.
Compared with NeMo step by step at every lookahead (every tap, the ``prompt`` tap among them, the caches
and the tokens), in another locale, with the prompt bypassed, and with a dictionary shifted by one.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from builders import copy_dir, stream_and_compare_one

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
pytest.importorskip("nemo", reason="NeMo is not installed (pip install '.[nemo]')")

from streaming_parity.backends.onnx.layout import (  # noqa: E402
    PROMPT_INPUTS,
    PROMPT_OUTPUTS,
    GraphInterfaceError,
    MissingGraphError,
    prompt_file,
    read_graph_metadata,
)
from streaming_parity.core.errors import InvalidInput  # noqa: E402
from streaming_parity.interface.driver import stream  # noqa: E402
from streaming_parity.interface.taps import TAP_ENCODER, TAP_PROMPT  # noqa: E402
from streaming_parity.interface.types import ShapeMismatchError  # noqa: E402
from streaming_parity.interface.utterance import Utterance  # noqa: E402
from streaming_parity.judge.compare import compare_runs  # noqa: E402
from streaming_parity.judge.loop import Candidate  # noqa: E402
from streaming_parity.judge.tolerances import Tolerances  # noqa: E402

pytestmark = [pytest.mark.onnx, pytest.mark.nemo]

PAD = "pad-and-drop"  # what the ONNX encoder graphs bake
LOCALES = {"en-US": 0, "en-GB": 1, "de-DE": 2, "es-ES": 3, "fr-FR": 4, "it-IT": 5, "ja-JP": 6, "zh-CN": 7}


def _shortest(count: int) -> list[Path]:
    from streaming_parity.fixtures.models import speech_manifest

    entries = sorted(speech_manifest(), key=lambda entry: entry["duration"])[:count]
    return [Path(entry["audio_filepath"]) for entry in entries]


AUDIO = _shortest(2)  # the two shortest fixture utterances


@pytest.fixture(scope="module")
def nemo(prompt_reference):
    return prompt_reference


@pytest.fixture(scope="module")
def export(prompt_nemo, tmp_path_factory) -> Path:
    from streaming_parity.interface.registry import get

    return get("onnx").prepare(prompt_nemo, tmp_path_factory.mktemp("onnx-prompt"))  # fp32 + taps + int8


@pytest.fixture(scope="module")
def onnx(export, prompt_nemo):
    from streaming_parity.interface.registry import get

    backend = get("onnx").load(export, nemo_path=prompt_nemo)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def utterances() -> list[Utterance]:
    return [Utterance.from_file(path) for path in AUDIO]


def _rewrite_metadata(directory: Path, edit) -> None:
    """``edit(decoded metadata) -> changed keys`` applied to every graph of an export directory."""
    import onnx

    from streaming_parity.backends.onnx import graph_tools
    from streaming_parity.backends.onnx.layout import decode_metadata, encode_metadata

    for path in sorted(directory.glob("*.onnx")):
        model = onnx.load(str(path), load_external_data=False)  # external weights stay where they are
        metadata = decode_metadata({p.key: p.value for p in model.metadata_props})
        graph_tools.set_metadata(model, encode_metadata(edit(metadata)))
        graph_tools.save_graph(model, path)


def _failures(outcome) -> list[str]:
    return [c.describe_failure() for c in outcome.results.comparisons if not c.passed]


# -- the export ---------------------------------------------------------------------------------------

def test_export_writes_the_prompt_graph_and_the_dictionary(export, nemo):
    import onnx

    from streaming_parity.backends.onnx.layout import read_view

    metadata = read_graph_metadata(export / prompt_file())
    assert metadata["graph"] == "prompt" and metadata["num_prompts"] == 128
    assert metadata["prompt_dictionary"] == LOCALES
    assert read_graph_metadata(export / "decoder_joint.onnx")["prompt_dictionary"] == LOCALES
    graph = onnx.load(str(export / prompt_file()))
    assert [i.name for i in graph.graph.input] == list(PROMPT_INPUTS)
    assert [o.name for o in graph.graph.output] == list(PROMPT_OUTPUTS)
    # The kernel's weights keep NeMo's names, layout and values.
    kernel = nemo.prompt_kernel()
    weights = {init.name: onnx.numpy_helper.to_array(init) for init in graph.graph.initializer}
    for name, array in (("prompt_kernel.0.weight", kernel.weight_in), ("prompt_kernel.0.bias", kernel.bias_in),
                        ("prompt_kernel.2.weight", kernel.weight_out), ("prompt_kernel.2.bias", kernel.bias_out)):
        np.testing.assert_array_equal(weights[name], array, err_msg=name)
    assert read_graph_metadata(export / prompt_file("int8"))["variant"] == "int8"
    assert {prompt_file(), prompt_file("int8")} <= set(json.loads((export / "export.json").read_text())["graphs"])
    # The fingerprint's view: the kernel's shapes and the prompt as NeMo's config states it.
    view = read_view(export)
    assert view.tensors["prompt_kernel.0.weight"].shape == (160, 208)
    assert view.tensors["prompt_kernel.2.weight"].shape == (80, 160)
    assert view.config["model_defaults"]["num_prompts"] == 128
    assert view.config["model_defaults"]["prompt_dictionary"] == LOCALES


def test_runtime_reads_the_prompt_from_the_export(onnx, nemo):
    assert onnx.info.prompted and onnx.info.num_prompts == 128
    assert onnx.info.prompt_dictionary == nemo.info.prompt_dictionary == tuple(sorted(LOCALES.items()))
    assert TAP_PROMPT in onnx.produced_taps()


# -- parity with NeMo -----------------------------------------------------------------------------------

def test_fp32_matches_nemo_at_every_step_of_every_lookahead(nemo, onnx, utterances):
    contexts = nemo.info.att_context_sizes
    assert len(contexts) == 4
    # NeMo's default first chunk (plain, the export's first-chunk graph) and pad-and-drop.
    outcome = stream_and_compare_one(nemo, Candidate.of(onnx, modes=("plain", PAD)), utterances, contexts)
    assert outcome.passed, _failures(outcome)
    comparisons = outcome.results.comparisons
    assert {(c.utterance, tuple(c.att_context_size), c.mode) for c in comparisons} == {
        (u.name, tuple(c), mode) for u in utterances for c in contexts for mode in ("plain", PAD)}
    for comparison in comparisons:
        steps = {t.step for t in comparison.taps if t.tap == TAP_ENCODER}
        assert steps and {t.step for t in comparison.taps if t.tap == TAP_PROMPT} == steps
        for cache in ("cache_last_channel", "cache_last_time", "cache_last_channel_len"):
            assert {t.step for t in comparison.taps if t.tap == cache} == steps, cache
        assert comparison.tokens_equal and comparison.reference_tokens, comparison.utterance


def test_another_locale_passes_and_differs_at_the_prompt_tap(nemo, onnx, utterances):
    german = [replace(u, prompt="de-DE") for u in utterances]
    contexts = [nemo.info.att_context_sizes[0], nemo.info.att_context_sizes[-1]]
    outcome = stream_and_compare_one(nemo, Candidate.of(onnx), german, contexts)
    assert outcome.passed, _failures(outcome)
    mel, _ = nemo.features(utterances[0].audio[None])
    english = stream(onnx, mel, contexts[0], PAD, prompt="en-US")
    other = stream(onnx, mel, contexts[0], PAD, prompt="de-DE")
    np.testing.assert_array_equal(english.steps[0].taps[TAP_ENCODER], other.steps[0].taps[TAP_ENCODER])
    assert not np.allclose(english.steps[0].taps[TAP_PROMPT], other.steps[0].taps[TAP_PROMPT], atol=1e-3)
    assert other.steps[-1].state.prompt == "de-DE"


def test_a_bypassed_prompt_fails_first_at_the_prompt_tap(nemo, onnx, utterances):
    context = nemo.info.att_context_sizes[0]
    outcome = stream_and_compare_one(nemo, Candidate.of(onnx, prompt=None), utterances[:1], [context])
    assert not outcome.passed
    (comparison,) = outcome.results.comparisons
    divergence = comparison.first_divergence()
    assert (divergence.tap, divergence.step) == (TAP_PROMPT, 0), comparison.describe_failure()
    assert len(comparison.causes) == 1 and "bypassed" in comparison.causes[0], comparison.causes
    # NeMo without set_inference_prompt: the prompt graph is not run, the tap is the encoder output.
    mel, _ = nemo.features(utterances[0].audio[None])
    run = stream(onnx, mel, context, PAD, prompt=None)
    for step in run.steps:
        np.testing.assert_array_equal(step.taps[TAP_PROMPT], step.taps[TAP_ENCODER])
        assert step.state.prompt is None


def test_a_shifted_dictionary_fails_at_the_prompt_tap(nemo, export, prompt_nemo, utterances, tmp_path):
    from streaming_parity.interface.registry import get

    shifted = copy_dir(export, tmp_path / "shifted")

    def shift(metadata):
        return {"prompt_dictionary": {locale: index + 1 for locale, index in metadata["prompt_dictionary"].items()}}

    _rewrite_metadata(shifted, shift)
    context = nemo.info.att_context_sizes[0]
    with get("onnx").load(shifted, nemo_path=prompt_nemo) as candidate:
        assert dict(candidate.info.prompt_dictionary)["en-US"] == 1
        outcome = stream_and_compare_one(nemo, Candidate.of(candidate), utterances[:1], [context])
    assert not outcome.passed
    (comparison,) = outcome.results.comparisons
    divergence = comparison.first_divergence()
    assert (divergence.tap, divergence.step) == (TAP_PROMPT, 0), comparison.describe_failure()
    assert len(comparison.causes) == 1 and "off by +1" in comparison.causes[0], comparison.causes
    encoder = [t for t in comparison.taps if t.tap == TAP_ENCODER]
    assert encoder and all(t.passed for t in encoder)  # only the prompt differs


def test_int8_prompt_tap_within_its_table(nemo, export, prompt_nemo, utterances):
    from streaming_parity.interface.registry import get

    tolerances = Tolerances.load()
    limits = tolerances.limits("nemo~onnx", "int8", TAP_PROMPT)
    assert limits  # [int8."nemo~onnx".prompt]
    with get("onnx").load(export, dtype="int8", nemo_path=prompt_nemo) as int8:
        for utterance in utterances:
            mel, _ = nemo.features(utterance.audio[None])
            for context in nemo.info.att_context_sizes:
                comparison = compare_runs(stream(nemo, mel, context, PAD, prompt="en-US"),
                                          stream(int8, mel, context, PAD, dtype="int8", prompt="en-US"),
                                          tolerances, num_layers=nemo.info.num_layers, utterance=utterance.name)
                prompt = [t for t in comparison.taps if t.tap == TAP_PROMPT]
                assert prompt and all(t.passed for t in prompt), [t.violations for t in prompt if not t.passed]


# -- refusals ---------------------------------------------------------------------------------------------

def test_unknown_locale_is_refused(onnx):
    context = onnx.info.att_context_sizes[0]
    with pytest.raises(InvalidInput, match="unknown prompt locale 'xx-XX'"):
        onnx.initial_state(context, prompt="xx-XX")


def test_a_prompt_for_a_model_without_one_is_refused(backend_pool, utterances):
    plain = backend_pool.get("onnx")  # tiny-streaming: no prompt kernel
    if plain.info.prompted:
        pytest.skip("the session's model is prompt-conditioned")
    assert plain.prompt_graph is None and TAP_PROMPT not in plain.produced_taps()
    context = plain.info.att_context_sizes[0]
    with pytest.raises(InvalidInput, match="without a prompt kernel"):
        plain.initial_state(context, prompt="en-US")
    from streaming_parity.interface.chunking import ChunkSchedule

    mel, _ = plain.features(utterances[0].audio[None])
    chunk = ChunkSchedule(plain.streaming_config(context), PAD).chunks(mel)[0]
    with pytest.raises(InvalidInput, match="without a prompt kernel"):
        plain.step(chunk, replace(plain.initial_state(context), prompt="en-US"))
    step = plain.step(chunk, plain.initial_state(context))
    assert TAP_PROMPT not in step.taps and step.state.prompt is None


def test_an_export_without_the_prompt_graph_is_refused(export, prompt_nemo, tmp_path):
    from streaming_parity.interface.registry import get

    for dtype in ("float32", "int8"):
        missing = copy_dir(export, tmp_path / dtype, without=(prompt_file(dtype),))
        with pytest.raises(MissingGraphError, match=f"missing graph {prompt_file(dtype)}"):
            get("onnx").load(missing, dtype=dtype, nemo_path=prompt_nemo)


def test_shape_surprises_are_refused(onnx, export, prompt_nemo, tmp_path):
    from streaming_parity.interface.registry import get

    wrong = np.zeros((1, 79, 5), np.float32)
    with pytest.raises(ShapeMismatchError, match=r"prompt.onnx input encoder_output: expected shape \('\*', 80, '\*'\), got \(1, 79, 5\)"):
        onnx.run_prompt(wrong, "en-US")
    # Metadata claiming another one-hot width than the kernel's weights take.
    narrowed = copy_dir(export, tmp_path / "narrowed")
    _rewrite_metadata(narrowed, lambda _metadata: {"num_prompts": 127})
    with pytest.raises(GraphInterfaceError, match=r"prompt_kernel.0.weight has shape \[160, 208\].*need \[160, 207\]"):
        get("onnx").load(narrowed, nemo_path=prompt_nemo)
    # An index outside the one-hot width.
    outside = copy_dir(export, tmp_path / "outside")
    _rewrite_metadata(outside, lambda _metadata: {"prompt_dictionary": {"en-US": 128}})
    with pytest.raises(GraphInterfaceError, match=r"prompt_dictionary\['en-US'\] = 128"):
        get("onnx").load(outside, nemo_path=prompt_nemo)


def test_int8_prompt_weight_shapes_are_checked_at_load(export, prompt_nemo, tmp_path):
    """The quantizer renames prompt.int8.onnx's weights, so they are found as its matrix products' weights
    ([in, out]): each against the kernel's shapes, whatever its element type."""
    import onnx
    from onnx import numpy_helper

    from streaming_parity.backends.onnx.graph_tools import matmul_weights
    from streaming_parity.interface.registry import get

    # The fp32 graph reads NeMo's weights through transposes: the same [in, out] shapes, under NeMo's names.
    fp32 = matmul_weights(onnx.load(str(export / prompt_file()), load_external_data=False).graph)
    assert fp32 == [("prompt_kernel.0.weight", [208, 160]), ("prompt_kernel.2.weight", [160, 80])]
    int8 = matmul_weights(onnx.load(str(export / prompt_file("int8")), load_external_data=False).graph)
    assert [shape for _, shape in int8] == [[208, 160], [160, 80]]
    assert not {name for name, _ in int8} & {name for name, _ in fp32}  # renamed: no name to look up
    get("onnx").load(export, dtype="int8", nemo_path=prompt_nemo).close()

    # Metadata claiming another one-hot width than the quantized kernel takes.
    narrowed = copy_dir(export, tmp_path / "narrowed")
    _rewrite_metadata(narrowed, lambda _metadata: {"num_prompts": 127})
    with pytest.raises(GraphInterfaceError, match=rf"prompt.int8.onnx: {int8[0][0]} \(quantized prompt_kernel.0.weight, "
                                                  r"\[in, out\]\) has shape \[208, 160\].*need \[207, 160\]"):
        get("onnx").load(narrowed, dtype="int8", nemo_path=prompt_nemo)

    # A quantized weight cut short (its output layer one column narrower than d_model).
    cut = copy_dir(export, tmp_path / "cut")
    model = onnx.load(str(cut / prompt_file("int8")))
    for index, init in enumerate(model.graph.initializer):
        if init.name == int8[1][0]:
            model.graph.initializer[index].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init)[:, :79],
                                                                            init.name))
    onnx.save(model, str(cut / prompt_file("int8")))
    with pytest.raises(GraphInterfaceError, match=rf"{int8[1][0]} \(quantized prompt_kernel.2.weight, \[in, out\]\) "
                                                  r"has shape \[160, 79\], but d_model 80 .* need \[160, 80\]"):
        get("onnx").load(cut, dtype="int8", nemo_path=prompt_nemo)


def test_older_exports_are_refused_and_not_reused(export, prompt_nemo, tmp_path):
    from streaming_parity.backends.onnx.export import cached_directory
    from streaming_parity.backends.onnx.layout import FORMAT
    from streaming_parity.interface.registry import get

    older = copy_dir(export, tmp_path / "older")
    _rewrite_metadata(older, lambda _metadata: {"format": "parity-nemo-cache-aware-rnnt/1"})
    with pytest.raises(GraphInterfaceError, match="older parity export-onnx: export again"):
        get("onnx").load(older, nemo_path=prompt_nemo)
    (older / "export.json").write_text(json.dumps({"source_sha256": "abc", "format": "parity-nemo-cache-aware-rnnt/1"}))
    written = []

    def write(staging: Path) -> dict:
        written.append(staging)
        return {"format": FORMAT}

    cached_directory(older, "export.json", "abc", write, fmt=FORMAT)
    assert len(written) == 1  # an older format's record: written again, not reused
    cached_directory(older, "export.json", "abc", write, fmt=FORMAT)
    assert len(written) == 1  # the current format's: reused


# -- another shape --------------------------------------------------------------------------------------

def test_another_prompt_width_and_dictionary(prompt_nemo, utterances, tmp_path):
    """16 prompts (the kernel's first 16 one-hot columns) and another dictionary: exported, read and matched."""
    import io
    import tarfile

    import yaml

    from streaming_parity.backends.onnx.export import export_cached
    from streaming_parity.fixtures.models import rewrite_checkpoint
    from streaming_parity.interface.registry import get

    d_model, width, locales = 80, 16, {"en-US": 3, "de-DE": 15}
    sliced = rewrite_checkpoint(prompt_nemo, tmp_path / "sliced.nemo", lambda state: {
        **state, "prompt_kernel.0.weight": state["prompt_kernel.0.weight"][:, :d_model + width].clone()})
    narrow = tmp_path / "narrow.nemo"
    with tarfile.open(sliced) as source, tarfile.open(narrow, "w") as target:
        for info in source.getmembers():
            data = source.extractfile(info).read() if info.isfile() else None
            if info.name.lstrip("./") == "model_config.yaml":
                config = yaml.safe_load(data)
                config["num_prompts"] = width
                config["model_defaults"].update(num_prompts=width, prompt_dictionary=locales)
                data = yaml.safe_dump(config).encode()
                info.size = len(data)
            target.addfile(info, io.BytesIO(data) if data is not None else None)
    context = (56, 6)
    export = export_cached(narrow, tmp_path / "onnx", att_context_sizes=[context], debug_taps=True)
    assert read_graph_metadata(export / prompt_file())["prompt_dictionary"] == locales
    with get("nemo").load(narrow) as nemo, get("onnx").load(export, nemo_path=narrow) as onnx:
        assert onnx.info.num_prompts == nemo.info.num_prompts == width
        assert onnx.info.prompt_dictionary == nemo.info.prompt_dictionary
        german = [replace(utterances[0], prompt="de-DE")]
        outcome = stream_and_compare_one(nemo, Candidate.of(onnx), german, [context])
        assert outcome.passed, _failures(outcome)
        assert any(t.tap == TAP_PROMPT for t in outcome.results.comparisons[0].taps)


def test_peer_formats_refuse_a_prompt_model_instead_of_bypassing_its_prompt(prompt_nemo, tmp_path):
    """sherpa-onnx's, NeMo's and parakeet-rs' exporters export the encoder and decoder_joint modules only: a
    Nemotron-3.5 model written that way would ignore its locale. Writing one is refused, and such files (here
    a NeMo-format export of tiny-streaming) checked against a prompt .nemo are refused, each naming why."""
    from streaming_parity.backends.onnx.foreign_read import ArtifactContradiction, read_foreign
    from streaming_parity.backends.onnx.peer_export import export_peer
    from streaming_parity.core.errors import Unsupported
    from streaming_parity.fixtures.models import build

    for fmt in ("sherpa-onnx", "nemo", "parakeet-rs"):
        with pytest.raises(Unsupported, match="bypass prompt_kernel and ignore the locale"):
            export_peer(prompt_nemo, tmp_path / fmt, fmt=fmt)
    plain = export_peer(build("tiny-streaming", progress=lambda _m: None), tmp_path / "plain", fmt="nemo",
                        att_context_sizes=[(70, 13)])
    with pytest.raises(ArtifactContradiction, match="has no prompt graph, but tiny-prompt.nemo is prompt-conditioned"):
        read_foreign(plain.out_dir, prompt_nemo)
