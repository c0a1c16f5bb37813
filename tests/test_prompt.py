"""The prompt-conditioned family (Nemotron-3.5, ``EncDecRNNTBPEModelWithPrompt``): the locale as a per-stream
input, NeMo's behaviour with it set and unset, and the judge naming a bypassed prompt or a shifted index."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from streaming_parity.core.errors import InvalidInput
from streaming_parity.core.nemo_config import NemoConfigError, read_model_config
from streaming_parity.interface.model_info import ModelInfo, PromptKernel
from streaming_parity.interface.taps import TAP_ENCODER, TAP_PROMPT
from streaming_parity.judge.prompts import BYPASSED, identify_prompt
from streaming_parity.judge.tolerances import Tolerances

LOCALES = {"en-US": 0, "en-GB": 1, "de-DE": 2}


def _config(**model_defaults):
    from streaming_parity.fixtures.models import FIXTURES

    config = FIXTURES["tiny-prompt"].config("tokenizer")
    config["model_defaults"].update(model_defaults)
    return config


# -- reading the config ---------------------------------------------------------------------------------

def test_prompt_config_reads_num_prompts_and_the_dictionary():
    model = read_model_config(_config(num_prompts=16, prompt_dictionary=LOCALES))
    assert model.prompt.num_prompts == 16 and model.prompt.hidden == 80
    assert model.prompt.dictionary == (("de-DE", 2), ("en-GB", 1), ("en-US", 0))
    info = ModelInfo.from_nemo_config(model, ["a"] * 128)
    assert info.prompted and info.num_prompts == 16
    assert info.prompt_index("de-DE") == 2 and info.prompt_locale(1) == "en-GB"
    assert info.prompt_index(None) is None
    assert info.default_prompt == "en-US"


def test_no_prompt_kernel_without_initialize_prompt_feature():
    """NeMo builds ``prompt_kernel`` only when ``initialize_prompt_feature`` is true: without it the model
    takes no locale, and one given is refused rather than ignored."""
    config = _config()
    del config["model_defaults"]["initialize_prompt_feature"]
    model = read_model_config(config)
    assert model.prompt is None
    info = ModelInfo.from_nemo_config(model, ["a"] * 128)
    assert not info.prompted and info.default_prompt is None
    with pytest.raises(InvalidInput, match="model without a prompt kernel"):
        info.initial_state((56, 13), prompt="en-US")


def test_bad_prompt_configs_and_locales_are_refused():
    with pytest.raises(NemoConfigError, match="prompt_dictionary.de-DE = 20 is outside the 16 prompts"):
        read_model_config(_config(num_prompts=16, prompt_dictionary={**LOCALES, "de-DE": 20}))
    with pytest.raises(NemoConfigError, match="not a mapping of locale"):
        read_model_config(_config(prompt_dictionary=["en-US"]))
    info = ModelInfo.from_nemo_config(read_model_config(_config(prompt_dictionary=LOCALES)), ["a"] * 128)
    with pytest.raises(InvalidInput, match="unknown prompt locale 'fr-FR'.*'de-DE', 'en-GB', 'en-US'"):
        info.initial_state((56, 13), prompt="fr-FR")
    no_english = ModelInfo.from_nemo_config(read_model_config(_config(prompt_dictionary={"de-DE": 0})), ["a"] * 128)
    with pytest.raises(InvalidInput, match="no en-US; name a locale"):
        no_english.default_prompt  # noqa: B018


# -- identifying the prompt a tap was computed with ------------------------------------------------------

def _random_kernel(rng, d_model: int, num_prompts: int) -> PromptKernel:
    scale_in, scale_out = 1 / np.sqrt(d_model + num_prompts), 1 / np.sqrt(2 * d_model)
    return PromptKernel(rng.uniform(-scale_in, scale_in, (2 * d_model, d_model + num_prompts)).astype(np.float32),
                        rng.uniform(-scale_in, scale_in, 2 * d_model).astype(np.float32),
                        rng.uniform(-scale_out, scale_out, (d_model, 2 * d_model)).astype(np.float32),
                        rng.uniform(-scale_out, scale_out, d_model).astype(np.float32))


@given(d_model=st.integers(4, 48), num_prompts=st.integers(2, 40), frames=st.integers(1, 9),
       seed=st.integers(0, 2**31 - 1), data=st.data())
def test_identify_prompt_names_the_index_or_the_bypass(d_model, num_prompts, frames, seed, data):
    """Any width, prompt count and chunk length: the index a tap was fused with is found (float32 noise
    included), the unfused encoder output is the bypass, and another kernel matches nothing."""
    rng = np.random.default_rng(seed)
    kernel = _random_kernel(rng, d_model, num_prompts)
    encoded = rng.standard_normal((1, d_model, frames)).astype(np.float32)
    index = data.draw(st.integers(0, num_prompts - 1))
    tolerances = Tolerances.load()
    fused = kernel.apply(encoded, index).astype(np.float32)
    assert identify_prompt(kernel, encoded, fused, tolerances, "nemo~x", "float32") == index
    assert identify_prompt(kernel, encoded, encoded.copy(), tolerances, "nemo~x", "float32") == BYPASSED
    other = _random_kernel(np.random.default_rng(seed + 1), d_model, num_prompts)
    assert identify_prompt(kernel, encoded, other.apply(encoded, index).astype(np.float32), tolerances,
                           "nemo~x", "float32") is None


# -- NeMo, the reference ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def prompt_models(prompt_nemo, prompt_reference):
    return prompt_nemo, prompt_reference


@pytest.mark.nemo
def test_nemo_reads_the_prompt_model_and_produces_the_prompt_tap(prompt_models):
    _path, nemo = prompt_models
    assert type(nemo.model).__name__ == "EncDecRNNTBPEModelWithPrompt"
    assert nemo.info.num_prompts == 128 and dict(nemo.info.prompt_dictionary)["de-DE"] == 2
    assert nemo.info.att_context_sizes == ((56, 13), (56, 6), (56, 1), (56, 0))
    assert TAP_PROMPT in nemo.produced_taps()
    kernel = nemo.prompt_kernel()
    assert kernel.num_prompts == 128 and kernel.weight_in.shape == (160, 208)


@pytest.mark.nemo
def test_nemo_stream_with_the_prompt_unset_does_not_match_one_with_it_set(prompt_models, utterances):
    """NeMo's ``_apply_prompt_to_encoded`` is a no-op until ``set_inference_prompt``: the bypassed stream's
    prompt tap is its encoder output, and it differs from the prompted stream's, tokens included (otherwise
    a bypass could not be caught on this fixture)."""
    from streaming_parity.interface.driver import stream

    _path, nemo = prompt_models
    utterance = utterances[0]
    mel, _ = nemo.features(utterance.audio[None])
    prompted = stream(nemo, mel, (56, 13), prompt="en-US")
    bypassed = stream(nemo, mel, (56, 13), prompt=None)
    german = stream(nemo, mel, (56, 13), prompt="de-DE")
    for step in bypassed.steps:
        np.testing.assert_array_equal(step.taps[TAP_PROMPT], step.taps[TAP_ENCODER])
        assert step.state.prompt is None
    assert prompted.steps[-1].state.prompt == "en-US"
    first = prompted.steps[0].taps
    assert np.abs(first[TAP_PROMPT] - bypassed.steps[0].taps[TAP_PROMPT]).max() > 1.0
    assert np.abs(first[TAP_PROMPT] - german.steps[0].taps[TAP_PROMPT]).max() > 1e-2
    assert prompted.tokens != bypassed.tokens and prompted.tokens != german.tokens


@pytest.mark.nemo
def test_nemo_offline_is_nemo_forward_with_prompt_indices(prompt_models, utterances):
    """The offline path is ``EncDecRNNTBPEModelWithPrompt.forward(prompt_indices=...)``; streaming with the same
    locale matches it at every lookahead (the streaming~offline bounds, [56,0] included)."""
    from streaming_parity.interface.driver import stream
    from streaming_parity.judge.compare import compare_streaming_to_offline

    _path, nemo = prompt_models
    tolerances = Tolerances.load()
    utterance = utterances[1]
    mel, _ = nemo.features(utterance.audio[None])
    for context in nemo.info.att_context_sizes:
        offline = nemo.offline(mel, np.array([mel.shape[-1]]), context, prompt="en-US")
        run = stream(nemo, mel, context, prompt="en-US")
        comparison = compare_streaming_to_offline(run, offline, tolerances, num_layers=nemo.info.num_layers)
        assert comparison.passed, comparison.describe_failure()
        bypassed = nemo.offline(mel, np.array([mel.shape[-1]]), context, prompt=None)
        np.testing.assert_array_equal(bypassed.taps[TAP_PROMPT], bypassed.taps[TAP_ENCODER])
        np.testing.assert_array_equal(bypassed.taps[TAP_ENCODER], offline.taps[TAP_ENCODER])
    with pytest.raises(InvalidInput, match="unknown prompt locale"):
        nemo.offline(mel, np.array([mel.shape[-1]]), (56, 13), prompt="xx-XX")


@pytest.mark.nemo
@pytest.mark.parametrize(("candidate_prompt", "cause"), [
    (None, "the prompt was bypassed (never set"),
    ("de-DE", "prompt_kernel at index 2 ('de-DE'), not 'en-US' (index 0): its prompt index is off by +2"),
    ("en-GB", "index 1 ('en-GB'), not 'en-US' (index 0): its prompt index is off by +1"),
])
def test_a_bypassed_or_shifted_prompt_is_caught_at_the_prompt_tap_and_named(prompt_models, utterances,
                                                                          candidate_prompt, cause):
    """A candidate streamed without the locale, or with another index, against the reference with en-US:
    the first divergence is the prompt tap at step 0 (the encoder before it agrees), and the cause is named."""
    from streaming_parity.backends.nemo import NemoBackend
    from streaming_parity.judge.loop import Candidate, stream_and_compare

    path, nemo = prompt_models
    with NemoBackend(path) as candidate:
        outcome = stream_and_compare(nemo, [Candidate.of(candidate, prompt=candidate_prompt)], utterances[:1],
                                     [(56, 6)], Tolerances.load(), include_offline=False)
    (comparison,) = outcome.results.comparisons
    assert not comparison.passed
    divergence = comparison.first_divergence()
    assert (divergence.tap, divergence.step) == (TAP_PROMPT, 0)
    assert all(t.passed for t in comparison.taps if t.tap in (TAP_ENCODER, "layers.2", "cache_last_channel"))
    assert any(cause in c for c in comparison.causes), comparison.causes
    assert cause in comparison.describe_failure()


@pytest.mark.nemo
def test_the_same_prompt_passes_and_names_no_cause(prompt_models, utterances):
    from streaming_parity.backends.nemo import NemoBackend
    from streaming_parity.judge.loop import Candidate, stream_and_compare
    from streaming_parity.judge.results import Results

    path, nemo = prompt_models
    with NemoBackend(path) as candidate:
        outcome = stream_and_compare(nemo, [Candidate.of(candidate)], utterances[:1], nemo.info.att_context_sizes,
                                     Tolerances.load(), include_offline=False)
    assert outcome.passed, [c.describe_failure() for c in outcome.results.comparisons if not c.passed]
    assert all(not c.causes for c in outcome.results.comparisons)
    assert all(any(t.tap == TAP_PROMPT for t in c.taps) for c in outcome.results.comparisons)
    saved = Results.from_dict(outcome.results.to_dict())
    assert [c.causes for c in saved.comparisons] == [[] for _ in outcome.results.comparisons]


@pytest.mark.nemo
def test_fingerprint_reports_the_prompt_kernel(prompt_models):
    from streaming_parity.detect.fingerprint import fingerprint

    path, _nemo = prompt_models
    report = fingerprint(path)
    assert report["weights"]["num_prompts"] == 128
    assert report["weights"]["prompt_kernel"]["prompt_kernel.0.weight"] == [160, 208]
    assert report["weights"]["prompt_kernel"]["prompt_kernel.2.weight"] == [80, 160]
    assert report["config"]["prompted"] is True and report["config"]["prompt_locales"] == 8
    assert report["weights"]["joint_output_index"] == report["config"]["joint_output_index"] == 1
    assert report["contradictions"] == []
