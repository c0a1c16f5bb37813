"""transformers 5's Nemotron ASR classes as a peer: the writer (``parity export-transformers``), the driver
(``transformers``: every tap and cache at every step) and transformers' own streaming ``generate()``
(``transformers-generate``), against NeMo.

What is pinned here: the writer's checkpoints load with transformers' own ``from_pretrained`` with every
parameter from the ``.nemo`` (both families, the joint output at ``joint_net.1`` and ``.2``, a shape no fixture
has); what transformers cannot express is refused by field and value; the driver matches NeMo tap by tap
at every full chunk and diverges, structurally, on a final partial chunk (one encoder frame fewer); a
transposed kernel and a swapped LSTM gate in a directory are named against the ``.nemo`` and placed at the
tap they feed; the generate() path drops the final partial chunk, and its encoder's divergence is named as
the missing right padding of the streaming subsampling.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("transformers", reason="transformers is not installed (pip install '.[transformers]')")
pytest.importorskip("nemo", reason="NeMo is not installed (pip install '.[nemo]')")

from builders import rewrite_nemo_config  # noqa: E402

from streaming_parity.core.errors import InvalidInput  # noqa: E402

pytestmark = pytest.mark.transformers


def _export(nemo, directory):
    from streaming_parity.backends.transformers.export import export_transformers

    export_transformers(nemo, directory)
    return directory


@pytest.fixture(scope="module")
def streaming_dir(tiny_nemo, tmp_path_factory):
    return _export(tiny_nemo, tmp_path_factory.mktemp("hf") / "tiny-streaming")


@pytest.fixture(scope="module")
def prompt_dir(prompt_nemo, tmp_path_factory):
    return _export(prompt_nemo, tmp_path_factory.mktemp("hf") / "tiny-prompt")


@pytest.fixture(scope="module")
def short_utterances():
    from streaming_parity.app.session import fixture_utterances

    return sorted(fixture_utterances(), key=lambda u: len(u.audio))[:3]


def _checkpoint(nemo):
    from streaming_parity.core.nemo_file import inspect_nemo, load_state_dict

    return load_state_dict(inspect_nemo(nemo))


def _loaded(directory):
    from transformers import AutoModelForRNNT, AutoProcessor

    model, info = AutoModelForRNNT.from_pretrained(str(directory), output_loading_info=True)
    return model, AutoProcessor.from_pretrained(str(directory)), info


@pytest.mark.parametrize("which", ["streaming", "prompt"])
def test_written_checkpoint_loads_with_from_pretrained_and_holds_every_nemo_tensor(which, request, tiny_nemo,
                                                                                  prompt_nemo):
    directory = request.getfixturevalue(f"{which}_dir")
    nemo = tiny_nemo if which == "streaming" else prompt_nemo
    model, processor, info = _loaded(directory)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    config = model.config.encoder_config
    # Fields a writer that leaves defaults would get wrong: 80 mels, left context 70, one lookahead.
    assert config.num_mel_bins == 128 and processor.feature_extractor.feature_size == 128
    left = 70 if which == "streaming" else 56
    assert config.sliding_window == left + 1
    assert processor.supported_num_lookahead_tokens == [13, 6, 1, 0]
    checkpoint = _checkpoint(nemo)
    index = 2 if which == "streaming" else 1  # tiny-prompt's joint has dropout 0: its output is joint_net.1
    assert np.array_equal(model.joint.head.weight.detach().numpy(), checkpoint[f"joint.joint_net.{index}.weight"].numpy())
    if which == "prompt":
        assert type(model).__name__ == "Nemotron3_5AsrForRNNT"
        assert processor.prompt_dictionary["de-DE"] == 2
        assert np.array_equal(model.prompt_projector.linear_1.weight.detach().numpy(),
                              checkpoint["prompt_kernel.0.weight"].numpy())


@pytest.mark.parametrize("edit, named", [
    (lambda c: c["encoder"].update(conv_norm_type="batch_norm"), "encoder.conv_norm_type = 'batch_norm'"),
    (lambda c: c["joint"]["jointnet"].update(joint_hidden=32), "joint.jointnet.joint_hidden = 32"),
    (lambda c: c["encoder"].update(att_context_size=[[70, 13], [64, 6]]), "encoder.att_context_size"),
    (lambda c: c["preprocessor"].update(normalize="per_feature"), "preprocessor.normalize = 'per_feature'"),
])
def test_what_transformers_cannot_express_is_refused_by_field_and_value(edit, named, tiny_nemo, tmp_path):
    from streaming_parity.backends.transformers.export import ExportRefused, export_transformers

    edited = rewrite_nemo_config(tiny_nemo, tmp_path / "edited.nemo", edit)
    with pytest.raises(ExportRefused, match="transformers cannot express") as refused:
        export_transformers(edited, tmp_path / "out")
    assert named in str(refused.value)
    assert not (tmp_path / "out").exists()


def _compare(nemo_backend, directory, utterances, contexts, *, nemo_path, dtype="float32"):
    from builders import stream_and_compare_one

    from streaming_parity.interface.registry import get
    from streaming_parity.judge.loop import Candidate

    entry = get("transformers")
    candidate = Candidate(label=f"transformers:{dtype}", capabilities=entry.capabilities, modes=("plain",),
                          open=lambda: entry.load(directory, dtype=dtype, nemo_path=nemo_path))
    return [c for c in stream_and_compare_one(nemo_backend, candidate, utterances, contexts).results.comparisons
            if c.candidate == "transformers"]


def _tail_frames(utterance, context) -> int:
    """Mel frames of the final chunk NeMo's plain schedule cuts (0 when the chunks end exactly)."""
    frames = len(utterance.audio) // 160 + 1
    first, later = 1 + 8 * context[1], 8 * (context[1] + 1)
    return (frames - first) % later if frames > first else 0


def test_driver_matches_nemo_at_every_full_chunk_and_loses_a_frame_of_a_final_partial_chunk(
        nemo_backend, streaming_dir, tiny_nemo, short_utterances):
    context = (70, 13)
    comparisons = _compare(nemo_backend, streaming_dir, short_utterances, [context], nemo_path=tiny_nemo)
    assert len(comparisons) == len(short_utterances)
    for comparison, utterance in zip(comparisons, short_utterances):
        steps = max(t.step for t in comparison.taps)
        compared = {t.tap.split(".")[0] for t in comparison.taps}
        assert {"pre_encode", "layers", "encoder", "cache_last_channel", "cache_last_time", "decoder", "joint"} <= compared
        for tap in comparison.taps:
            # Every tap of every full chunk is within the fp32 tolerances; only the final partial chunk differs.
            if tap.step < steps or _tail_frames(utterance, context) % 8 == 0:
                assert tap.passed, (utterance.name, tap.step, tap.tap, tap.violations)
        if _tail_frames(utterance, context) % 8:
            last = [t for t in comparison.taps if t.step == steps and t.tap == "encoder"][0]
            assert last.reference_shape[-1] == last.candidate_shape[-1] + 1


def test_prompt_family_driver_matches_nemo_with_the_prompt_tap(prompt_reference, prompt_dir, prompt_nemo,
                                                               short_utterances):
    context = (56, 6)
    comparisons = _compare(prompt_reference, prompt_dir, short_utterances[:2], [context], nemo_path=prompt_nemo)
    for comparison, utterance in zip(comparisons, short_utterances):
        prompt_taps = [t for t in comparison.taps if t.tap == "prompt"]
        full_chunks = prompt_taps[:-1] if _tail_frames(utterance, context) % 8 else prompt_taps
        assert full_chunks and all(t.passed for t in full_chunks)
        assert max(t.metrics["max_abs"] for t in full_chunks) < 1e-5


def _mutated(source, target, edit):
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, target)
    weights = load_file(str(target / "model.safetensors"))
    edit(weights)
    save_file(weights, str(target / "model.safetensors"), metadata={"format": "pt"})
    return target


def test_a_transposed_kernel_and_a_swapped_gate_are_named_and_placed(nemo_backend, streaming_dir, tiny_nemo, tmp_path,
                                                                      short_utterances):
    def transpose(weights):
        name = "encoder.layers.1.self_attn.q_proj.weight"
        weights[name] = weights[name].T.contiguous()

    def swap_gates(weights):
        import torch

        name = "decoder.lstm.weight_ih_l0"
        i, f, g, o = weights[name].chunk(4)  # torch.nn.LSTM's gate blocks: input, forget, cell, output
        weights[name] = torch.cat([f, i, g, o]).contiguous()

    transposed = _mutated(streaming_dir, tmp_path / "transposed", transpose)
    swapped = _mutated(streaming_dir, tmp_path / "swapped", swap_gates)
    from streaming_parity.interface.registry import get

    with get("transformers").load(transposed, nemo_path=tiny_nemo) as backend:
        notes = "\n".join(backend.notes())
    assert ("encoder.layers.1.self_attn.q_proj.weight (from encoder.layers.1.self_attn.linear_q.weight), feeds tap "
            "layers.1: the .nemo's tensor with its first two axes swapped") in notes
    with get("transformers").load(swapped, nemo_path=tiny_nemo) as backend:
        notes = "\n".join(backend.notes())
    assert "decoder.lstm.weight_ih_l0 (from decoder.prediction.dec_rnn.lstm.weight_ih_l0), feeds tap decoder" in notes
    assert "input gate holds the .nemo's forget" in notes

    one = short_utterances[:1]
    placed = _compare(nemo_backend, transposed, one, [(70, 13)], nemo_path=tiny_nemo)[0]
    first = next(t for t in placed.taps if not t.passed)
    assert (first.step, first.tap) == (0, "layers.1")
    placed = _compare(nemo_backend, swapped, one, [(70, 13)], nemo_path=tiny_nemo)[0]
    failing = [t.tap for t in placed.taps if not t.passed and t.step == 0]
    assert "decoder" in failing and not any(t.startswith(("layers", "encoder")) for t in failing)


def test_a_directory_contradicting_the_nemo_is_refused(streaming_dir, tiny_nemo, tmp_path):
    from streaming_parity.interface.registry import get

    edited = shutil.copytree(streaming_dir, tmp_path / "edited")
    config = json.loads((edited / "config.json").read_text())
    config["encoder_config"]["scale_input"] = False
    (edited / "config.json").write_text(json.dumps(config))
    with pytest.raises(InvalidInput, match="encoder_config.scale_input = False contradicts the .nemo's True"):
        get("transformers").load(edited, nemo_path=tiny_nemo)


def test_generate_drops_the_final_partial_chunk_and_its_encoder_lacks_the_right_padding(
        nemo_backend, streaming_dir, tiny_nemo, short_utterances):
    from streaming_parity.interface.registry import get
    from streaming_parity.judge.peer_audit import diagnose_peer
    from streaming_parity.judge.tolerances import Tolerances

    context = (70, 13)
    utterance = next(u for u in short_utterances if _tail_frames(u, context) % 8)
    with get("transformers-generate").load(streaming_dir, nemo_path=tiny_nemo) as runtime:
        mel = nemo_backend.features(utterance.audio[None])[0]
        chunks = runtime.own_chunks(mel, context)
        assert chunks[-1].start_frame + chunks[-1].num_new_frames < mel.shape[-1] - 8
        steps = list(runtime.stream_audio(utterance.audio[None], context))
        assert len(steps) == len(chunks)
        diagnosis = diagnose_peer(nemo_backend, runtime, [utterance], [context], Tolerances.load())
    causes = "\n".join(diagnosis.causes)
    assert "encoder offline, fed nemo's mel: cleared" in causes
    assert "with final-chunk-right-pad" in causes and "within tolerance everywhere" in causes


def test_a_shape_no_fixture_has(tmp_path, short_utterances):
    from streaming_parity.fixtures.models import build
    from streaming_parity.interface.registry import get

    nemo = build("unseen-4x96", progress=lambda _m: None)
    directory = _export(nemo, tmp_path / "unseen")
    with get("nemo").load(nemo) as reference:
        comparisons = _compare(reference, directory, short_utterances[:1], [(70, 6)], nemo_path=nemo)
    layer_taps = [t for t in comparisons[0].taps if t.tap.startswith("layers.3")]
    assert layer_taps and all(t.passed for t in layer_taps[:-1])
