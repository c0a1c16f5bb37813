"""Fixture models: deterministic, realistic module names, and no tensor left at its constant init."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from streaming_parity.fixtures.models import FIXTURES, SPEECH_MANIFEST, speech_manifest


def test_speech_fixtures_are_committed_and_described():
    import soundfile as sf

    entries = speech_manifest()
    assert len(entries) >= 8
    voices = {json.loads(line)["voice"] for line in SPEECH_MANIFEST.read_text().splitlines()}
    speeds = {json.loads(line)["speed"] for line in SPEECH_MANIFEST.read_text().splitlines()}
    assert len(voices) >= 2 and len(speeds) >= 2
    for entry in entries:
        info = sf.info(entry["audio_filepath"])
        assert info.samplerate == 16000 and info.channels == 1
        assert 1.0 <= info.duration <= 12.0
        assert entry["duration"] == pytest.approx(info.duration, abs=1e-3)
        assert entry["text"] == entry["text"].lower().strip()


def test_full_model_is_defined_but_not_built_by_default():
    spec = FIXTURES["full-0.6b"]
    assert not spec.default_test
    assert spec.encoder["n_layers"] == 24 and spec.encoder["d_model"] == 1024
    assert spec.vocab_size == 1024


def test_a_fixture_asked_for_at_once_is_built_once(tmp_path, monkeypatch):
    """Test workers ask for the same fixture at the same time: one builds it while the others wait, and all of them
    get that one file (a second build would replace it with other bytes under a running test)."""
    import threading
    import time

    from streaming_parity.fixtures import models

    monkeypatch.setenv("PARITY_CACHE", str(tmp_path))
    builds = []

    def build_slowly(name, spec, nemo_path, progress):
        builds.append(name)
        time.sleep(0.5)  # long enough for every other caller to arrive while this one builds
        nemo_path.parent.mkdir(parents=True)
        nemo_path.write_bytes(f"build {len(builds)}".encode())
        return nemo_path

    monkeypatch.setattr(models, "_build", build_slowly)
    paths = []
    callers = [threading.Thread(target=lambda: paths.append(models.build("tiny-streaming", progress=lambda _m: None)))
               for _ in range(3)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join()
    assert builds == ["tiny-streaming"] and len(set(paths)) == 1 and paths[0].read_bytes() == b"build 1"


@pytest.mark.nemo
def test_tiny_streaming_weights_are_perturbed_and_named_like_real_checkpoints(tiny_nemo):
    from streaming_parity.core.nemo_file import inspect_nemo, load_state_dict

    archive = inspect_nemo(tiny_nemo)
    state = load_state_dict(archive)
    encoder = archive.config["encoder"]
    assert encoder["causal_downsampling"] and encoder["att_context_style"] == "chunked_limited"
    assert encoder["n_layers"] >= 3 and encoder["conv_kernel_size"] == 9
    # Dropout > 0 in the joint puts its output layer at index 2, as in every trained checkpoint.
    assert "joint.joint_net.2.weight" in state
    # Causal dw_striding on 128 mels: 128 -> 65 -> 33 -> 17 frequency bins.
    channels = encoder["subsampling_conv_channels"]
    assert state["encoder.pre_encode.out.weight"].shape[1] == channels * 17
    for name, tensor in state.items():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("pos_bias_u", "pos_bias_v") or leaf == "bias":
            assert tensor.abs().max() > 0, f"{name} left at zero"
        if "norm" in name and leaf == "weight":
            assert (tensor - 1).abs().max() > 0, f"{name} left at one"
    u, v = state["encoder.layers.0.self_attn.pos_bias_u"], state["encoder.layers.0.self_attn.pos_bias_v"]
    assert (u - v).abs().max() > 0


@pytest.mark.nemo
def test_fixtures_cli_prints_the_cached_path(tiny_nemo, capsys):
    from streaming_parity.app.cli import main

    assert main(["fixtures", "--model", "tiny-streaming"]) == 0
    assert Path(capsys.readouterr().out.strip()) == tiny_nemo
