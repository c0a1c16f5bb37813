"""The prompt-conditioned family (Nemotron-3.5 ASR streaming, ``EncDecRNNTBPEModelWithPrompt``) in the MLX
port, against NeMo on the ``tiny-prompt`` fixture.

The stream's locale becomes a one-hot column through the artifact's own ``prompt_dictionary`` and is fused
into the encoder output by ``prompt_kernel`` (NeMo's ``_apply_prompt_to_encoded``); the result is the
``prompt`` tap, what the decoder and joint read. Checked here: every step of every lookahead in both
first-chunk modes and offline (fp32, the shared limits), another locale, the two silent failures (a
bypassed prompt, a shifted dictionary) caught at the ``prompt`` tap at step 0, the converter's refusals,
teacher forcing, verification and the reduced-precision tables.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from builders import copy_dir, rewrite_nemo_config, stream_and_compare_one

pytestmark = [pytest.mark.nemo, pytest.mark.mlx]
pytest.importorskip("nemo", reason="NeMo is not installed (pip install '.[nemo]')")
mx = pytest.importorskip("mlx.core", reason="mlx is not installed (pip install '.[mlx]')")

from streaming_parity.core.errors import InvalidInput  # noqa: E402
from streaming_parity.interface.taps import TAP_ENCODER, TAP_PROMPT, layer_tap  # noqa: E402
from streaming_parity.judge.loop import Candidate  # noqa: E402
from streaming_parity.judge.tolerances import Tolerances  # noqa: E402

SHORT_UTTERANCES = ("utt04.wav", "utt07.wav")  # the two shortest fixture utterances (1.3 s, 1.6 s)
MODES = ("plain", "pad-and-drop")
PROMPT_WEIGHT = "prompt_kernel.0.weight"


@pytest.fixture(scope="module")
def nemo(prompt_reference):
    return prompt_reference


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mlx-prompt")


@pytest.fixture(scope="module")
def artifacts(prompt_nemo, work):
    """The converted artifact per dtype (unverified: the tests compare it themselves)."""
    from streaming_parity.backends.mlx.convert import convert

    made: dict[str, Path] = {}

    def artifact(dtype: str = "float32") -> Path:
        if dtype not in made:
            made[dtype] = convert(prompt_nemo, work / f"mlx-{dtype}", dtype=dtype, skip_verify=True).published
        return made[dtype]

    return artifact


@pytest.fixture(scope="module")
def mlx(artifacts):
    from streaming_parity.interface.registry import get

    backend = get("mlx").load(artifacts("float32"))
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def utterances():
    from streaming_parity.fixtures.models import speech_manifest
    from streaming_parity.interface.utterance import Utterance

    entries = {Path(e["audio_filepath"]).name: e for e in speech_manifest()}
    return [Utterance.from_file(entries[name]["audio_filepath"], entries[name]["text"]) for name in SHORT_UTTERANCES]


@pytest.fixture(scope="module")
def tolerances() -> Tolerances:
    return Tolerances.load()


def _with_prompt(utterances, locale: str):
    from dataclasses import replace

    return [replace(u, prompt=locale) for u in utterances]


# -- the model, the mapping, the artifact ---------------------------------------------------------------

def test_the_artifact_keeps_the_prompt_and_maps_its_kernel_exactly(prompt_nemo, nemo, artifacts, mlx):
    from streaming_parity.backends.mlx import mapping, tensors_as_source
    from streaming_parity.backends.mlx.artifact import read_config
    from streaming_parity.detect.diagnose import compare_tensors_to_source, source_state

    artifact = artifacts("float32")
    defaults = read_config(artifact)["model_defaults"]
    assert defaults["num_prompts"] == 128 and defaults["prompt_dictionary"]["de-DE"] == 2
    assert mlx.info.prompted and mlx.info.prompt_dictionary == nemo.info.prompt_dictionary
    assert mlx.info.num_prompts == nemo.info.num_prompts == 128
    assert TAP_PROMPT in mlx.produced_taps()
    rule = mapping.match_source(PROMPT_WEIGHT).rule
    assert rule.name == "prompt kernel (prompt-conditioned)" and rule.layout is mapping.UNCHANGED
    shapes = {name: array.shape for name, _, array, _ in tensors_as_source(artifact) if name.startswith("prompt_")}
    assert shapes == {"prompt_kernel.0.weight": (160, 80 + 128), "prompt_kernel.0.bias": (160,),
                      "prompt_kernel.2.weight": (80, 160), "prompt_kernel.2.bias": (80,)}
    assert compare_tensors_to_source(tensors_as_source(artifact), source_state(prompt_nemo)) == []
    # The kernel the backend gives (for naming a prompt divergence) is NeMo's.
    ours, theirs = mlx.prompt_kernel(), nemo.prompt_kernel()
    for field in ("weight_in", "bias_in", "weight_out", "bias_out"):
        np.testing.assert_array_equal(getattr(ours, field), getattr(theirs, field))


def test_the_model_card_names_the_prompt(artifacts):
    from streaming_parity.app import model_card

    card = model_card.render(artifacts("float32"))
    assert "Prompt-conditioned" in card and "column of 128" in card and "`de-DE` (2)" in card


# -- float32: every step of every lookahead, both first-chunk modes, offline ----------------------------

def test_every_lookahead_and_mode_matches_nemo_fp32(nemo, mlx, utterances, tolerances):
    outcome = stream_and_compare_one(nemo, Candidate.of(mlx, modes=MODES, compare_offline=True), utterances,
                                     tolerances=tolerances)
    num_layers = nemo.info.num_layers
    expected = {"pre_encode", TAP_ENCODER, TAP_PROMPT, "decoder", "joint", "cache_last_channel", "cache_last_time",
                "cache_last_channel_len", *(layer_tap(i) for i in range(num_layers))}
    comparisons = outcome.results.comparisons
    contexts = {tuple(c) for c in nemo.info.att_context_sizes}
    assert {(c.att_context_size, c.mode) for c in comparisons} == {(c, m) for c in contexts
                                                                   for m in (*MODES, "offline")}
    assert len(comparisons) == len(utterances) * len(contexts) * 3
    worst: dict[str, float] = {}
    for comparison in comparisons:
        assert comparison.passed, comparison.describe_failure()
        assert comparison.tokens_equal and comparison.reference_tokens, comparison.utterance
        steps = sorted({t.step for t in comparison.taps if t.tap == TAP_ENCODER})
        for step in steps:
            judged = {t.tap for t in comparison.taps if t.step == step}
            assert TAP_PROMPT in judged, f"{comparison.mode} step {step}: the prompt tap was not compared"
            if comparison.mode != "offline":
                assert expected <= judged, f"step {step}: not compared: {sorted(expected - judged)}"
        for tap in ("encoder", "prompt", "decoder", "joint"):
            for result in (t for t in comparison.taps if t.tap == tap):
                worst[tap] = max(worst.get(tap, 0.0), result.metrics["max_abs"])
    print("nemo~mlx float32 tiny-prompt worst max_abs: " + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))


def test_another_locale_passes_and_changes_the_prompt_tap(nemo, mlx, utterances, tolerances):
    german = _with_prompt(utterances, "de-DE")
    outcome = stream_and_compare_one(nemo, Candidate.of(mlx, modes=("plain",)), german, tolerances=tolerances)
    for comparison in outcome.results.comparisons:
        assert comparison.passed, comparison.describe_failure()
    english = stream_and_compare_one(nemo, Candidate.of(mlx, modes=("plain",)), utterances, [(56, 13)], tolerances)
    key = ("mlx:float32", utterances[0].name, (56, 13), "plain")
    de_run, en_run = outcome.runs[key], english.runs[key]
    assert de_run.steps[0].state.prompt == "de-DE" and en_run.steps[0].state.prompt == "en-US"
    np.testing.assert_array_equal(de_run.steps[0].taps[TAP_ENCODER], en_run.steps[0].taps[TAP_ENCODER])
    difference = np.abs(de_run.steps[0].taps[TAP_PROMPT] - en_run.steps[0].taps[TAP_PROMPT]).max()
    assert difference > 1e-2, f"de-DE and en-US prompt taps differ by only {difference:.1e}"


def test_a_bypassed_prompt_fails_at_the_prompt_tap_at_step_0(nemo, mlx, utterances, tolerances):
    outcome = stream_and_compare_one(nemo, Candidate.of(mlx, modes=("plain",), prompt=None), utterances[:1],
                                     [(56, 13)], tolerances)
    (comparison,) = outcome.results.comparisons
    assert not comparison.passed
    divergence = comparison.first_divergence()
    assert (divergence.tap, divergence.step) == (TAP_PROMPT, 0), comparison.describe_failure()
    assert any("bypassed" in cause for cause in comparison.causes), comparison.causes
    run = outcome.runs[("mlx:float32", utterances[0].name, (56, 13), "plain")]
    step = run.steps[0]
    assert step.state.prompt is None
    np.testing.assert_array_equal(step.taps[TAP_PROMPT], step.taps[TAP_ENCODER])  # NeMo's bypass


def test_a_shifted_prompt_dictionary_fails_at_the_prompt_tap(nemo, artifacts, work, utterances, tolerances):
    from streaming_parity.interface.registry import get

    shifted = copy_dir(artifacts("float32"), work / "mlx-shifted-dictionary")
    config = json.loads((shifted / "config.json").read_text())
    dictionary = config["model_defaults"]["prompt_dictionary"]
    config["model_defaults"]["prompt_dictionary"] = {locale: index + 1 for locale, index in dictionary.items()}
    (shifted / "config.json").write_text(json.dumps(config))
    with get("mlx").load(shifted) as backend:
        assert backend.info.prompt_index("en-US") == 1  # the artifact's own copy of the dictionary
        outcome = stream_and_compare_one(nemo, Candidate.of(backend, modes=("plain",), compare_offline=True),
                                         utterances[:1], [(56, 13)], tolerances)
    streaming, offline = outcome.results.comparisons
    for comparison in (streaming, offline):
        assert not comparison.passed
        assert comparison.first_divergence().tap == TAP_PROMPT, comparison.describe_failure()
    assert streaming.first_divergence().step == 0
    assert any("off by +1" in cause for cause in streaming.causes), streaming.causes


# -- the backend's inputs: teacher forcing, refusals ----------------------------------------------------

def test_teacher_forcing_keeps_the_prompt(nemo, mlx, utterances):
    from streaming_parity.interface.driver import stream
    from streaming_parity.judge.forcing import reference_decisions

    mel, _ = nemo.features(utterances[1].audio[None])
    reference = stream(nemo, mel, (56, 1), "plain", prompt="de-DE")
    forced = stream(mlx, mel, (56, 1), "plain", prompt="de-DE", forced_decisions=reference_decisions(reference))
    assert forced.tokens == reference.tokens and reference.tokens
    assert all(step.state.prompt == "de-DE" and TAP_PROMPT in step.taps for step in forced.steps)


def test_unknown_locales_are_refused(mlx):
    mel = np.zeros((1, mlx.info.n_mels, 40), np.float32)
    with pytest.raises(InvalidInput, match="unknown prompt locale 'xx-XX'"):
        mlx.initial_state((56, 13), prompt="xx-XX")
    with pytest.raises(InvalidInput, match="unknown prompt locale 'xx-XX'"):
        mlx.offline(mel, np.array([40]), (56, 13), prompt="xx-XX")


def _without_prompt(config: dict) -> None:
    config["model_defaults"]["initialize_prompt_feature"] = False


def test_the_converter_refuses_missing_or_unexpected_prompt_weights(prompt_nemo, tmp_path):
    from streaming_parity.backends.mlx.convert import ConversionError, convert
    from streaming_parity.fixtures.models import rewrite_checkpoint

    stripped = rewrite_checkpoint(prompt_nemo, tmp_path / "stripped.nemo",
                                  lambda state: {k: v for k, v in state.items() if not k.startswith("prompt_kernel.")})
    with pytest.raises(ConversionError, match=r"expects 4 tensor\(s\) the checkpoint does not provide: "
                                              r"prompt_kernel\.0\.bias"):
        convert(stripped, tmp_path / "stripped", skip_verify=True)
    assert not (tmp_path / "stripped").exists()

    unexpected = rewrite_nemo_config(prompt_nemo, tmp_path / "no-prompt-config.nemo", _without_prompt)
    with pytest.raises(ConversionError, match=r"prompt_kernel\.\d\.(weight|bias) \(shape .*\) maps to "
                                              r"prompt_kernel\.\d\.(weight|bias) by rule 'prompt kernel"):
        convert(unexpected, tmp_path / "unexpected", skip_verify=True)
    assert not (tmp_path / "unexpected").exists()


def test_a_prompt_on_a_model_without_one_is_refused(prompt_nemo, tmp_path):
    """The same checkpoint without its prompt (config and weights): it converts, and a locale is refused."""
    from streaming_parity.backends.mlx.convert import convert
    from streaming_parity.interface.registry import get

    plain = rewrite_nemo_config(prompt_nemo, tmp_path / "plain.nemo", _without_prompt,
                            lambda state: {k: v for k, v in state.items() if not k.startswith("prompt_kernel.")})
    artifact = convert(plain, tmp_path / "plain", skip_verify=True).published
    with get("mlx").load(artifact) as backend:
        assert not backend.info.prompted and TAP_PROMPT not in backend.produced_taps()
        assert backend.prompt_kernel() is None
        with pytest.raises(InvalidInput, match="without a prompt kernel"):
            backend.initial_state((56, 13), prompt="en-US")
        mel = np.zeros((1, backend.info.n_mels, 40), np.float32)
        with pytest.raises(InvalidInput, match="without a prompt kernel"):
            backend.offline(mel, np.array([40]), (56, 13), prompt="en-US")
        out = backend.offline(mel, np.array([40]), (56, 13))
        assert TAP_PROMPT not in out.taps


# -- verification, reduced precision --------------------------------------------------------------------

def test_verification_compares_the_prompt_tap(prompt_nemo, nemo, artifacts, utterances):
    from streaming_parity.app.verify import verify_artifact

    verification = verify_artifact(artifacts("float32"), prompt_nemo, reference=nemo, utterances=utterances[:1],
                                   att_context_sizes=[(56, 6)], device="cpu")
    assert verification.passed, verification.failures()
    worst = verification.to_dict()["worst_max_abs"]["56,6"]
    assert set(worst) == {"plain", "offline"}
    assert all(by_tap[TAP_PROMPT] < 1e-4 for by_tap in worst.values())


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_reduced_precision_prompt_within_its_table(dtype, prompt_nemo, nemo, artifacts, utterances):
    """Verification at bfloat16/float16: the prompt tap against its ``[<dtype>."nemo~mlx".prompt]`` table."""
    from streaming_parity.app.verify import verify_artifact

    verification = verify_artifact(artifacts(dtype), prompt_nemo, reference=nemo, utterances=utterances,
                                   modes=MODES, device="cpu")
    prompt_results = [t for e in verification.entries for t in e.comparison.taps if t.tap == TAP_PROMPT]
    assert prompt_results and all(t.passed for t in prompt_results), [t.violations for t in prompt_results
                                                                      if not t.passed]
    assert verification.passed, verification.failures()
    worst = max(t.metrics["rel_l2"] for t in prompt_results)
    print(f"nemo~mlx {dtype} tiny-prompt prompt tap worst rel_l2 {worst:.1e}")


def test_parity_verify_prints_the_prompt_line(prompt_nemo, artifacts, utterances, capsys, tmp_path):
    from streaming_parity.app.cli import EXIT_OK, main
    from streaming_parity.fixtures.models import SPEECH_DIR

    code = main(["verify", str(artifacts("float32")), "--nemo", str(prompt_nemo), "--audio",
                 str(SPEECH_DIR / utterances[0].name), "--att-context", "56,13", "--json", str(tmp_path / "en.json")])
    out = capsys.readouterr()
    assert code == EXIT_OK, out.out + out.err
    assert "prompt kernel worst max_abs: plain" in out.out
    # --prompt: the locale every stream is given (both backends map it through their own dictionary).
    code = main(["verify", str(artifacts("float32")), "--nemo", str(prompt_nemo), "--audio",
                 str(SPEECH_DIR / utterances[0].name), "--att-context", "56,13", "--prompt", "de-DE",
                 "--json", str(tmp_path / "de.json")])
    out = capsys.readouterr()
    assert code == EXIT_OK, out.out + out.err
    english, german = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("en", "de"))
    assert german["passed"]
    (en_plain, *_), (de_plain, *_) = english["comparisons"], german["comparisons"]
    assert en_plain["mode"] == de_plain["mode"] == "plain"
    assert de_plain["candidate_tokens"] == de_plain["reference_tokens"] != en_plain["reference_tokens"]


# -- another shape: 16 prompts --------------------------------------------------------------------------

def test_sixteen_prompts_match_nemo(prompt_nemo, utterances, tolerances, tmp_path):
    """``num_prompts`` 16 (the kernel's first Linear 80 + 16 wide) through a rewritten checkpoint."""
    from streaming_parity.backends.mlx.convert import convert
    from streaming_parity.interface.registry import get

    def sixteen(config: dict) -> None:
        config["model_defaults"]["num_prompts"] = 16
        if "num_prompts" in config:
            config["num_prompts"] = 16

    narrowed = rewrite_nemo_config(prompt_nemo, tmp_path / "sixteen.nemo", sixteen, lambda state: {
        **state, PROMPT_WEIGHT: state[PROMPT_WEIGHT][:, :80 + 16].clone()})
    artifact = convert(narrowed, tmp_path / "sixteen", skip_verify=True).published
    chinese = _with_prompt(utterances[:1], "zh-CN")
    with get("nemo").load(narrowed) as nemo, get("mlx").load(artifact) as mlx:
        assert nemo.info.num_prompts == mlx.info.num_prompts == 16
        assert mlx.prompt_kernel().weight_in.shape == (160, 96)
        outcome = stream_and_compare_one(nemo, Candidate.of(mlx, modes=("plain",), compare_offline=True), chinese,
                                         [(56, 0)], tolerances)
    assert len(outcome.results.comparisons) == 2
    for comparison in outcome.results.comparisons:
        assert comparison.passed, comparison.describe_failure()
        assert any(t.tap == TAP_PROMPT for t in comparison.taps)
