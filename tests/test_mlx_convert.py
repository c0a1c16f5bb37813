"""The NeMo -> MLX converter: exact round trip, strictness, atomic publication, parakeet-mlx loading."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from builders import run_cli

pytestmark = pytest.mark.mlx
mx = pytest.importorskip("mlx.core", reason="mlx is not installed (pip install '.[mlx]')")

from streaming_parity.app.verify import verifier  # noqa: E402
from streaming_parity.backends.mlx import artifact, mapping  # noqa: E402
from streaming_parity.backends.mlx import convert as converter  # noqa: E402
from streaming_parity.backends.mlx.convert import ConversionError, VerificationFailed, convert, failed_report_path  # noqa: E402
from streaming_parity.core.nemo_file import inspect_nemo, load_state_dict, sha256_file  # noqa: E402
from streaming_parity.fixtures.models import rewrite_checkpoint  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
SHORT_AUDIO = REPO_ROOT / "streaming_parity" / "fixtures" / "speech" / "utt04.wav"


@pytest.fixture(scope="session")
def fp32_artifact(tiny_nemo, work_dir) -> Path:
    from streaming_parity.backends.mlx import prepare

    return prepare(tiny_nemo, work_dir, dtype="float32")


@pytest.fixture(scope="session")
def source_state(tiny_nemo):
    return load_state_dict(inspect_nemo(tiny_nemo))


# -- the mapping ----------------------------------------------------------------------------------

def test_round_trip_is_exact(fp32_artifact, source_state):
    """Every MLX tensor mapped back equals its NeMo source bit for bit (summed LSTM biases: the sum)."""
    import torch

    covered: set[str] = set()
    for file in (mapping.MODEL_FILE, mapping.FRONTEND_FILE):
        for name, array in artifact.iter_tensors(fp32_artifact, file):
            for sources, back in mapping.to_nemo(name, array, file):
                expected = sum((source_state[s] for s in sources[1:]), source_state[sources[0]].clone())
                assert back.shape == tuple(expected.shape), f"{name} -> {sources}: {back.shape} vs {tuple(expected.shape)}"
                assert np.array_equal(back, expected.numpy()), f"{name} -> {sources} differs after the round trip"
                covered.update(sources)
    dropped = {n for n in source_state if mapping.match_source(n).rule.is_drop}
    assert covered | dropped == set(source_state), f"not round-tripped: {sorted(set(source_state) - covered - dropped)}"
    assert all(isinstance(t, torch.Tensor) for t in source_state.values())


def test_every_source_tensor_has_a_named_rule(source_state):
    for name in source_state:
        match = mapping.match_source(name)
        assert match is not None and match.rule.name, name


def test_joint_output_index_follows_the_dropout(tiny_nemo):
    """NeMo's joint output layer is joint_net.2 with dropout and joint_net.1 without: never assumed."""
    config = converter.artifact_config(inspect_nemo(tiny_nemo).config, ["a"] * 128)
    assert "joint.joint_net.2.weight" in converter.expected_targets(config)[mapping.MODEL_FILE]
    config["joint"]["jointnet"]["dropout"] = 0.0
    names = converter.expected_targets(config)[mapping.MODEL_FILE]
    assert "joint.joint_net.1.weight" in names and "joint.joint_net.2.weight" not in names


# -- strictness: unknown key, wrong shape, missing tensor --------------------------------------------

def _edited(tiny_nemo, tmp_path, edit) -> Path:
    return rewrite_checkpoint(tiny_nemo, tmp_path / "edited.nemo", edit)


def test_unknown_tensor_stops_the_conversion(tiny_nemo, tmp_path):
    import torch

    nemo = _edited(tiny_nemo, tmp_path, lambda s: {**s, "spec_augmentation.mask": torch.zeros(3)})
    out = tmp_path / "artifact"
    with pytest.raises(ConversionError, match=r"spec_augmentation\.mask \(shape \(3,\)\): no mapping rule"):
        convert(nemo, out, skip_verify=True)
    assert not out.exists()
    assert not list(tmp_path.glob(".artifact.staging-*"))


def test_unexpected_module_stops_the_conversion(tiny_nemo, tmp_path):
    import torch

    nemo = _edited(tiny_nemo, tmp_path, lambda s: {**s, "encoder.layers.0.adapter.weight": torch.zeros(4, 4)})
    with pytest.raises(ConversionError, match=r"encoder\.layers\.0\.adapter\.weight \(shape \(4, 4\)\).*does not have"):
        convert(nemo, tmp_path / "artifact", skip_verify=True)
    assert not (tmp_path / "artifact").exists()


def test_wrong_shape_names_the_tensor_and_both_shapes(tiny_nemo, tmp_path):
    def edit(state):
        state["encoder.layers.1.self_attn.linear_q.weight"] = state["encoder.layers.1.self_attn.linear_q.weight"][:, :63]
        return state

    with pytest.raises(ConversionError, match=r"encoder\.layers\.1\.self_attn\.linear_q\.weight.*"
                                              r"shape \(64, 63\).*expects \(64, 64\)"):
        convert(_edited(tiny_nemo, tmp_path, edit), tmp_path / "artifact", skip_verify=True)
    assert not (tmp_path / "artifact").exists()


def test_missing_tensor_is_named(tiny_nemo, tmp_path):
    def edit(state):
        del state["encoder.layers.2.norm_out.bias"]
        return state

    with pytest.raises(ConversionError, match=r"encoder\.layers\.2\.norm_out\.bias"):
        convert(_edited(tiny_nemo, tmp_path, edit), tmp_path / "artifact", skip_verify=True)


def test_half_an_lstm_bias_is_named(tiny_nemo, tmp_path):
    def edit(state):
        del state["decoder.prediction.dec_rnn.lstm.bias_hh_l1"]
        return state

    with pytest.raises(ConversionError, match=r"lstm\.1\.bias.*bias_hh_l1"):
        convert(_edited(tiny_nemo, tmp_path, edit), tmp_path / "artifact", skip_verify=True)


# -- verified, atomic publication ---------------------------------------------------------------------

def test_convert_publishes_a_verified_artifact(tiny_nemo, tmp_path, capsys):
    out = tmp_path / "artifact"
    code = run_cli(capsys, "convert", tiny_nemo, "--out", out, "--audio", SHORT_AUDIO,
                   "--att-context", "70,13").code
    assert code == 0
    expected_files = {"model.safetensors", "frontend.safetensors", "config.json", "tokenizer.model",
                      "artifact.json", "parity.json"}
    assert expected_files <= {p.name for p in out.iterdir()}
    report = json.loads((out / "parity.json").read_text())
    assert report["passed"] is True
    assert report["source"]["sha256"] == sha256_file(tiny_nemo)
    assert report["artifact"]["weights_sha256"]["model.safetensors"] == sha256_file(out / "model.safetensors")
    assert report["artifact"]["tensors_sha256"]["model.safetensors"]
    assert set(report["worst_max_abs"]) == {"70,13"}
    assert report["worst_max_abs"]["70,13"]["plain"]["layers.2"] <= 1e-4
    assert report["tolerances"]["sha256"] and report["environment"]["versions"]["mlx"]
    config = json.loads((out / "config.json").read_text())
    assert config["target"] == inspect_nemo(tiny_nemo).config["target"]
    assert {"preprocessor", "encoder", "decoder", "joint", "decoding", "model_defaults"} <= set(config)
    assert len(config["joint"]["vocabulary"]) == config["decoder"]["vocab_size"]

    # parity verify re-runs the check (it passed above, in convert); a corrupted weight makes it fail.
    _corrupt_one_weight(out / "model.safetensors", "encoder.layers.1.feed_forward2.linear2.weight")
    verify = run_cli(capsys, "verify", out, "--nemo", tiny_nemo, "--audio", SHORT_AUDIO, "--att-context", "70,13")
    assert verify.code == 1


def _corrupt_one_weight(path: Path, name: str) -> None:
    weights = dict(mx.load(str(path)))
    weights[name] = weights[name] * 1.01
    mx.save_safetensors(str(path), weights)


def test_failed_verification_publishes_nothing(tiny_nemo, tmp_path, monkeypatch, capsys):
    """A deliberately corrupted weight: exit 1, nothing at DIR, the report kept beside it."""
    original = converter._apply

    def corrupting(rule, source_name, tensor, target, expected):
        array = original(rule, source_name, tensor, target, expected)
        return array * 1.01 if target == "encoder.layers.0.self_attn.linear_v.weight" else array

    monkeypatch.setattr(converter, "_apply", corrupting)
    out = tmp_path / "artifact"
    code = run_cli(capsys, "convert", tiny_nemo, "--out", out, "--audio", SHORT_AUDIO,
                   "--att-context", "70,13").code
    assert code == 1
    assert not out.exists()
    assert not list(tmp_path.glob(".artifact.*"))
    report = json.loads(failed_report_path(out).read_text())
    assert report["passed"] is False and report["failures"]
    assert "layers.0" in report["failures"][0]  # the first divergent tap is where the corruption is


def test_existing_artifact_is_never_half_overwritten(tiny_nemo, nemo_backend, tmp_path, monkeypatch):
    out = tmp_path / "artifact"
    convert(tiny_nemo, out, skip_verify=True)
    before = {p.name: sha256_file(p) for p in out.iterdir()}
    with pytest.raises(ConversionError, match="already exists"):
        convert(tiny_nemo, out, skip_verify=True)
    original = converter._apply
    monkeypatch.setattr(converter, "_apply", lambda rule, s, t, target, e: original(rule, s, t, target, e) * 1.01)
    with pytest.raises(VerificationFailed):
        convert(tiny_nemo, out, overwrite=True, verify=verifier(tiny_nemo, reference=nemo_backend,
                                                                utterances=_short_utterances(),
                                                                att_context_sizes=[(70, 13)]))
    assert {p.name: sha256_file(p) for p in out.iterdir()} == before


def _short_utterances():
    from streaming_parity.interface.utterance import Utterance

    return [Utterance.from_file(SHORT_AUDIO)]


def test_cli_reports_conversion_errors_without_traceback(tiny_nemo, tmp_path, capsys):
    import torch

    nemo = _edited(tiny_nemo, tmp_path, lambda s: {**s, "mystery.tensor": torch.zeros(2)})
    cli = run_cli(capsys, "convert", nemo, "--out", tmp_path / "artifact", "--skip-verify")
    assert cli.code == 2
    assert "mystery.tensor" in cli.err
    assert not (tmp_path / "artifact").exists()


# -- other checkpoints ------------------------------------------------------------------------------

def test_non_causal_tdt_artifact_loads_in_parakeet_mlx(tmp_path):
    """A non-causal FastConformer-TDT artifact loads in parakeet-mlx with strict=True; encoders agree."""
    pytest.importorskip("parakeet_mlx", reason="parakeet-mlx is not installed (a test-only dependency: "
                                               "pip install parakeet-mlx)")
    pytest.importorskip("nemo", reason="building the tiny-tdt fixture needs NeMo")
    from parakeet_mlx.utils import from_config

    from streaming_parity.backends.mlx.model import ModelArgs, StreamingRNNT
    from streaming_parity.fixtures.models import build

    nemo = build("tiny-tdt", progress=lambda _m: None)
    out = tmp_path / "tdt"
    convert(nemo, out, skip_verify=True)
    config = json.loads((out / "config.json").read_text())
    assert config["target"] == inspect_nemo(nemo).config["target"]
    assert config["model_defaults"]["tdt_durations"] == [0, 1, 2, 3, 4]

    parakeet = from_config(config)
    assert type(parakeet).__name__ == "ParakeetTDT"
    parakeet.load_weights(str(out / "model.safetensors"), strict=True)

    ours = StreamingRNNT(ModelArgs.from_nemo_config(config))
    ours.load_weights(str(out / "model.safetensors"), strict=True)
    mel = mx.array(np.random.default_rng(0).standard_normal((1, 128, 200)).astype(np.float32))
    theirs, _ = parakeet.encoder(mel.transpose(0, 2, 1))
    mine = ours.encoder(mel, np.array([200]), (-1, -1)).encoded.transpose(0, 2, 1)
    assert np.abs(np.array(theirs) - np.array(mine)).max() < 1e-4
