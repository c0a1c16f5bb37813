"""mlx-audio's own Nemotron-3.5 streaming ASR as a peer backend, and the diagnosis that names its silent failures.

On the tiny-prompt fixture (joint dropout 0, so its joint output layer is saved as ``joint.joint_net.1``):
mlx-audio's converter runs; its ``strict=False`` load leaves ``joint.joint_net.2`` random and the audit says
so; its front end pads the STFT by reflection where NeMo pads with zeros, and the diagnosis names it with
figures; with the joint fixed and NeMo's mel fed in, its encoder agrees with NeMo's within fp32 tolerance.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("mlx", reason="mlx is not installed (pip install '.[mlx]')")
pytest.importorskip("mlx_audio", reason="mlx-audio is not installed (pip install --no-deps mlx-audio==0.6.2 miniaudio)")
pytest.importorskip("nemo", reason="NeMo is not installed (pip install '.[nemo]')")

from streaming_parity.interface.peer import LoadedParameters  # noqa: E402
from streaming_parity.judge.peer_audit import audit_parameters, diagnose_peer  # noqa: E402
from streaming_parity.judge.tolerances import Tolerances  # noqa: E402

pytestmark = pytest.mark.mlx_audio

CONTEXT = (56, 13)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("mlx-audio")


@pytest.fixture(scope="module")
def peer(prompt_nemo, work):
    from streaming_parity.interface.registry import get

    entry = get("mlx-audio")
    backend = entry.load(entry.prepare(prompt_nemo, work), nemo_path=prompt_nemo)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def reference(prompt_reference):
    return prompt_reference


@pytest.fixture(scope="module")
def checkpoint(prompt_nemo):
    from streaming_parity.core.nemo_file import inspect_nemo, load_state_dict

    return {name: value.numpy() for name, value in load_state_dict(inspect_nemo(prompt_nemo)).items()}


@pytest.fixture(scope="module")
def short_utterance():
    from streaming_parity.app.session import fixture_utterances

    return min(fixture_utterances(), key=lambda u: len(u.audio))


def test_converter_runs_and_is_cached(prompt_nemo, work):
    from streaming_parity.interface.registry import get

    entry = get("mlx-audio")
    directory = entry.prepare(prompt_nemo, work)
    for name in ("config.json", "model.safetensors", "tokenizer.model", "vocab.txt", "conversion.json"):
        assert (directory / name).is_file(), name
    assert entry.detect(directory) == "mlx-audio nemotron_asr"
    assert entry.detect(prompt_nemo.parent) is None
    stamp = (directory / "model.safetensors").stat().st_mtime_ns
    assert entry.prepare(prompt_nemo, work) == directory
    assert (directory / "model.safetensors").stat().st_mtime_ns == stamp  # cached, not converted again
    assert not [p for p in work.iterdir() if p.name.startswith(".")]  # no staging directory left behind


def test_streams_audio_with_the_prompt_locale(peer, short_utterance):
    from streaming_parity.interface.registry import get

    assert get("mlx-audio").capabilities == peer.capabilities
    assert peer.info.num_prompts == 128 and peer.info.prompt_dictionary["de-DE"] == 2
    runs = {}
    for locale in ("en-US", "de-DE"):
        steps = list(peer.stream_audio(short_utterance.audio[None], CONTEXT, prompt=locale))
        assert len(steps) >= 2
        for step in steps:
            assert set(step.taps) == {"encoder", "prompt"}
            assert step.taps["encoder"].shape[:2] == (1, peer.info.d_model)
            assert step.taps["prompt"].shape == step.taps["encoder"].shape
        assert [s.taps["encoder"].shape[-1] for s in steps][0] == CONTEXT[1] + 1  # its native chunk
        runs[locale] = steps
    en, de = runs["en-US"], runs["de-DE"]
    np.testing.assert_array_equal(en[0].taps["encoder"], de[0].taps["encoder"])  # the prompt acts after the encoder
    assert not np.allclose(en[0].taps["prompt"], de[0].taps["prompt"])
    with pytest.raises(Exception, match="not one of"):
        next(peer.stream_audio(short_utterance.audio[None], CONTEXT, prompt="xx-XX"))


def test_silent_random_joint_is_named(peer, checkpoint):
    audit = audit_parameters(checkpoint, peer.loaded_parameters())
    failures = audit.silent_failures
    assert len(failures) == 1, audit.lines()
    joint = failures[0]
    assert joint.kind == "not_loaded"
    assert sorted(joint.names) == ["joint.joint_net.1.bias", "joint.joint_net.1.weight"]
    assert sorted(joint.expected_as) == ["joint.joint_net.2.bias", "joint.joint_net.2.weight"]
    assert joint.max_abs > 0.1  # the runtime's joint_net.2 is not the checkpoint's layer: it is random
    text = "\n".join(audit.lines())
    assert "joint.joint_net.1.{bias,weight}" in text and "expects joint.joint_net.2.{bias,weight}" in text
    assert "strict=False" in text and "random initial value" in text
    assert audit.loaded == audit.parameters - 2


def test_front_end_and_streaming_encoder_named_with_figures(reference, peer, checkpoint, short_utterance):
    from streaming_parity.judge.results import Results

    diagnosis = diagnose_peer(reference, peer, [short_utterance], [CONTEXT], Tolerances.load(),
                              checkpoint=checkpoint, prompt="en-US")
    mel = [c for c in diagnosis.checks if c.part == "mel"]
    plain = next(c for c in mel if not c.corrections)
    fixed = next(c for c in mel if c.corrections == ("stft-pad-constant",))
    assert not plain.passed and plain.first_frame == 0 and plain.max_abs > 1e-2
    assert fixed.passed and fixed.max_abs < 1e-3
    causes = "\n".join(diagnosis.causes)
    assert "reflect padding of the STFT" in causes and "constant (zero) padding" in causes
    assert "joint.joint_net.1" in causes
    assert diagnosis.first_divergence.startswith("tap mel") and "frame 0" in diagnosis.first_divergence
    offline = next(c for c in diagnosis.checks if c.part == "encoder offline")
    assert offline.passed, offline.text()
    results = Results(model={}, tolerances="")
    results.extra["peer_diagnosis"] = [{**diagnosis.to_dict(), "lines": diagnosis.lines()}]
    assert json.loads(json.dumps(results.to_dict()))["extra"]["peer_diagnosis"][0]["causes"] == diagnosis.causes


def test_with_joint_fixed_and_nemo_mel_encoder_agrees(reference, prompt_nemo, work, short_utterance):
    """A checkpoint whose joint output layer is named as mlx-audio expects loads completely; fed NeMo's mel, its
    encoder matches NeMo's offline, and streaming once its input scaling is applied."""
    from streaming_parity.core.nemo_file import inspect_nemo, load_state_dict
    from streaming_parity.fixtures.models import rewrite_checkpoint
    from streaming_parity.interface.registry import get
    from streaming_parity.judge.peer_audit import compare_frames, reference_streaming_encoder

    def rename(state):
        return {k.replace("joint.joint_net.1.", "joint.joint_net.2."): v for k, v in state.items()}

    fixed_nemo = rewrite_checkpoint(prompt_nemo, work / "joint-fixed.nemo", rename)
    entry = get("mlx-audio")
    with entry.load(entry.prepare(fixed_nemo, work / "fixed"), nemo_path=fixed_nemo) as peer:
        checkpoint = {k: v.numpy() for k, v in load_state_dict(inspect_nemo(fixed_nemo)).items()}
        assert audit_parameters(checkpoint, peer.loaded_parameters()).silent_failures == []
        limit = Tolerances.load().limits("nemo~mlx-audio", "float32", "encoder")["max_abs"]
        mel, length = reference.features(short_utterance.audio[None])
        mel = mel[:, :, :int(length[0])]
        offline = reference.offline(mel, length, CONTEXT)
        check = compare_frames("encoder offline", short_utterance.name, offline.encoded[0, :, :int(offline.encoded_len[0])],
                               peer.encode_mel(mel, CONTEXT, offline=True)[0][0], limit)
        assert check.passed and check.max_abs < 1e-5, check.text()
        streamed, _ = reference_streaming_encoder(reference, mel, CONTEXT)
        steps = peer.encode_mel(mel, CONTEXT, corrections=("streaming-xscale",))
        check = compare_frames("encoder streaming", short_utterance.name, streamed,
                               np.concatenate([s[0] for s in steps], axis=-1), limit)
        assert check.passed, check.text()


def test_audit_on_another_shape():
    """A parameter no tensor reaches, a value that differs, and a summed LSTM bias that matches, on made-up names."""
    rng = np.random.default_rng(0)
    checkpoint = {"enc.w": rng.normal(size=(3, 5)).astype(np.float32),
                  "dec.bias_ih_l0": np.ones(4, np.float32), "dec.bias_hh_l0": np.full(4, 2.0, np.float32),
                  "head.0.weight": rng.normal(size=(7, 2)).astype(np.float32)}
    loaded = LoadedParameters(
        runtime="toy", strict=False,
        artifact={"enc.w": ("enc.w",), "dec.0.bias": ("dec.bias_ih_l0", "dec.bias_hh_l0"),
                  "head.0.weight": ("head.0.weight",)},
        parameters={"enc.w": checkpoint["enc.w"] + 0.5, "dec.0.bias": np.full(4, 3.0, np.float32),
                    "head.0.weight": checkpoint["head.0.weight"], "extra.scale": np.zeros(9, np.float32)})
    audit = audit_parameters(checkpoint, loaded)
    kinds = {(f.kind, tuple(f.names)) for f in audit.silent_failures}
    assert kinds == {("differs", ("enc.w",)), ("initial", ("extra.scale",))}
    assert audit.loaded == 3
    assert any("extra.scale [9] left at its initial value" in line for line in audit.lines())


def test_nightly_peer_check_runs_mlx_audio_on_the_prompt_family_and_the_report_names_both_findings(
        work, utterances, tmp_path, monkeypatch):
    """The nightly's peer check takes mlx-audio to the prompt fixture (it refuses the trained fixture, which has
    no prompt), and the report names the silent random joint and the reflect-padded front end."""
    from streaming_parity.app import nightly
    from streaming_parity.report import write_report

    shortest = sorted(utterances, key=lambda u: len(u.audio))[:1]
    monkeypatch.setattr(nightly, "_peer_check_utterances", lambda _model: shortest)
    plan = nightly.MatrixPlan([nightly.PlannedCandidate("mlx-audio", "float32")], [])
    checked = nightly.run_peer_check(plan, work_dir=work, tolerances=Tolerances.load())
    assert [r.extra["model"] for r in checked] == ["tiny-prompt"]  # trained-streaming skipped: no prompt
    (results,) = checked
    assert results.comparisons and all(not c.gating and not c.passed for c in results.comparisons)
    (diagnosis,) = results.extra["peer_diagnosis"]
    text = "\n".join(diagnosis["lines"])
    assert "joint.joint_net.1.{bias,weight} [129, 64] not loaded" in text and "strict=False" in text
    assert "reflect padding" in text and "first divergence: tap mel, frame 0" in text
    report = write_report([results], tmp_path, title="peers")
    markdown = (tmp_path / "report.md").read_text()
    assert "What a peer runtime computes differently" in markdown and "joint_net.1" in markdown
    assert report is not None
