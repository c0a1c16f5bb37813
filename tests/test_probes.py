"""The probe set and ``parity probes``.

The generator is deterministic and each probe's audio has the property its name claims (no model needed).
On ``tiny-streaming`` with its ONNX fp32 export at [70,13]: the command runs a few probe classes, reports a
verdict per probe and candidate (pass, refused with the message), saves them as results that re-judge; a
candidate that mishandles its first chunk fails the cold-start probe and no other, and one that carries
state from one stream to the next fails the reset probe.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from streaming_parity.fixtures.probes import (
    CLASSES,
    ENCODER_FRAME,
    HOP,
    LARGEST_CHUNK,
    LEAD_IN_SECONDS,
    LEFT_CONTEXT_SECONDS,
    SAMPLE_RATE,
    fingerprint,
    peak_dbfs,
    probe_set,
    resample_fft,
)
from streaming_parity.judge import probes as judged

LONG = 12.0  # seconds: the long-stream probe's length in these tests (600 s in the nightly)
CONTEXT = (70, 13)


@pytest.fixture(scope="module", params=["fixture", "trained"])
def probes(request):
    """Built from the fixture speech, and from the trained fixture's held-out test set."""
    return {probe.name: probe for probe in probe_set(long_seconds=LONG, speech=request.param)}


def _leading_zeros(audio: np.ndarray) -> int:
    return int(np.argmax(np.abs(audio) > 0))


# -- the generator ----------------------------------------------------------------------------------------

def test_generator_is_deterministic():
    first, second = probe_set(long_seconds=LONG), probe_set(long_seconds=LONG)
    assert fingerprint(first) == fingerprint(second)
    assert fingerprint(probe_set(long_seconds=LONG, speech="trained")) != fingerprint(first)
    for a, b in zip(first, second):
        assert a.describe() == b.describe()
        for x, y in zip(a.streams, b.streams):
            assert x.audio.tobytes() == y.audio.tobytes() and x.audio.dtype == np.float32


def test_every_class_has_probes_and_only_known_classes(probes):
    assert {p.failure_class for p in probes.values()} == set(CLASSES)
    assert all(p.expect in judged.EXPECTATIONS and p.targets for p in probes.values())
    only = probe_set(long_seconds=LONG, classes=["cold-start"])
    assert [p.name for p in only] == [f"leading-silence-{s}" for s in ("0ms", "90ms", "500ms", "5s")]
    with pytest.raises(ValueError, match="unknown probe class"):
        probe_set(classes=["no-such-class"])


def test_leading_silence_and_lead_in(probes):
    for label, seconds in (("0ms", 0.0), ("90ms", 0.09), ("500ms", 0.5), ("5s", 5.0)):
        audio = probes[f"leading-silence-{label}"].streams[0].audio
        silent = int(round(seconds * SAMPLE_RATE))
        assert _leading_zeros(audio) == silent
        # the speech starts at once: its first 10 ms already within 30 dB of its peak
        head = audio[silent:silent + HOP]
        assert 20 * np.log10(np.max(np.abs(head))) > peak_dbfs(audio) - 30
    for name in ("tail-mid-chunk", "level-minus-40dbfs", "two-utterances", "stereo"):
        audio = probes[name].streams[0].audio
        assert _leading_zeros(audio if audio.ndim == 1 else audio[:, 0]) >= int(LEAD_IN_SECONDS * SAMPLE_RATE)


def test_lengths_against_chunk_and_frame(probes):
    tail = len(probes["tail-mid-chunk"].streams[0].audio)
    frames = tail // HOP
    assert tail % ENCODER_FRAME == ENCODER_FRAME // 2  # 40 ms into an encoder frame
    for chunk in (8, 16, 56, 112):  # the chunk (mel frames) of [70,0], [70,1], [70,6], [70,13]
        assert frames % chunk != 0
    short = len(probes["shorter-than-chunk"].streams[0].audio)
    assert ENCODER_FRAME < short < LARGEST_CHUNK
    assert 0 < len(probes["shorter-than-frame"].streams[0].audio) < ENCODER_FRAME
    assert len(probes["empty"].streams[0].audio) == 0
    word = probes["isolated-word"].streams[0].audio
    assert _leading_zeros(word) >= LEFT_CONTEXT_SECONDS * SAMPLE_RATE
    spoken = np.flatnonzero(np.abs(word) > 0)
    assert (spoken[-1] - spoken[0]) / SAMPLE_RATE < 0.5
    long = next(p for p in probes.values() if p.long)
    assert long.failure_class == "long-stream" and long.seconds >= LONG


def test_levels(probes):
    quiet = probes["level-minus-40dbfs"].streams[0].audio
    assert peak_dbfs(quiet) == pytest.approx(-40.0, abs=0.01)
    clipped = probes["clipped"].streams[0].audio
    assert np.max(np.abs(clipped)) == 1.0 and np.mean(np.abs(clipped) == 1.0) > 0.05
    dc = probes["dc-offset"].streams[0].audio
    assert np.mean(dc[: int(LEAD_IN_SECONDS * SAMPLE_RATE)]) == pytest.approx(0.1, abs=1e-6)


def test_rates_and_channels(probes):
    reference = probes["level-minus-40dbfs"].streams[0].audio
    for name, rate in (("rate-8khz", 8000), ("rate-44k1hz", 44100), ("rate-48khz", 48000)):
        stream = probes[name].streams[0]
        assert stream.sample_rate == rate and stream.channels == 1
        assert stream.seconds == pytest.approx(len(reference) / SAMPLE_RATE, abs=1e-3)
        back = resample_fft(stream.audio, rate, SAMPLE_RATE)[: len(reference)]
        assert np.corrcoef(back, reference)[0, 1] > 0.9  # the same speech (8 kHz keeps what lies below 4 kHz)
    stereo = probes["stereo"].streams[0]
    assert stereo.channels == 2 and np.array_equal(stereo.audio[:, 1], stereo.audio[:, 0] * np.float32(0.5))


def test_reset_streams_the_same_audio_around_another(probes):
    reset = probes["reset-between-streams"]
    first, primer, second = reset.streams
    assert reset.same_tokens == (first.name, second.name)
    assert np.array_equal(first.audio, second.audio) and len(primer.audio) > len(first.audio)


def test_input_stage_resamples_or_refuses_as_declared(probes):
    from streaming_parity.app.probes import admit
    from streaming_parity.interface.audio import AudioError
    from streaming_parity.interface.backend import Capabilities

    class Declares:
        capabilities = Capabilities()

    rate, stereo = probes["rate-8khz"].streams[0], probes["stereo"].streams[0]
    with pytest.raises(AudioError, match=r"sample rate 8000 Hz; the models take 16000 Hz \(use --resample\)"):
        admit(rate, Declares(), resample=False, mix_to_mono=True)
    with pytest.raises(AudioError, match=r"2 channels; the models take mono \(use --mix-to-mono\)"):
        admit(stereo, Declares(), resample=True, mix_to_mono=False)
    audio = admit(rate, Declares(), resample=True, mix_to_mono=True)
    assert audio.ndim == 1 and len(audio) == pytest.approx(rate.seconds * SAMPLE_RATE, abs=2)
    assert np.array_equal(admit(stereo, Declares(), resample=False, mix_to_mono=True),
                          stereo.audio.mean(axis=1).astype(np.float32))


# -- through the backends ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def onnx_export(tiny_nemo, tmp_path_factory) -> Path:
    pytest.importorskip("onnxruntime")
    from streaming_parity.interface.registry import get

    return get("onnx").prepare(tiny_nemo, tmp_path_factory.mktemp("probes-onnx"), att_context_sizes=[CONTEXT])


@pytest.fixture(scope="module")
def onnx_backend(onnx_export, tiny_nemo):
    from streaming_parity.interface.registry import get

    backend = get("onnx").load(onnx_export, nemo_path=tiny_nemo)
    yield backend
    backend.close()


def _verdicts(data: dict, backend: str) -> dict[str, dict]:
    return {v["probe"]: v for v in data["extra"]["probes"]["verdicts"] if v["backend"] == backend}


@pytest.mark.nemo
@pytest.mark.onnx
def test_cli_reports_each_class_per_candidate_and_rejudges(tiny_nemo, onnx_export, tmp_path, capsys):
    from streaming_parity.app.cli import EXIT_OK, EXIT_VIOLATION, main
    from streaming_parity.judge.results import Results

    out = tmp_path / "probes.json"
    classes = "cold-start,tiny-input,input-format,chunk-size"
    code = main(["probes", str(tiny_nemo), "--onnx", str(onnx_export), "--att-context", "70,13", "--class", classes,
                 "--no-resample", "--json", str(out)])
    printed = capsys.readouterr().out
    assert code == EXIT_OK, printed
    assert "probes: onnx:float32" in printed and "probes: nemo:float32 (reference)" in printed
    data = json.loads(out.read_text())
    onnx = _verdicts(data, "onnx:float32")
    definitions = data["extra"]["probes"]["definitions"]
    assert set(onnx) == {d["name"] for d in definitions}
    assert {onnx[d["name"]]["failure_class"] for d in definitions} == set(classes.split(","))
    for name in ("leading-silence-0ms", "leading-silence-90ms", "leading-silence-500ms", "leading-silence-5s",
                 "stereo"):
        assert onnx[name]["verdict"] == judged.PASS, onnx[name]
    for name in ("rate-8khz", "rate-44k1hz", "rate-48khz"):  # --no-resample: the declared 16 kHz only
        assert onnx[name]["verdict"] == judged.REFUSED and "use --resample" in onnx[name]["detail"]
    assert onnx["chunk-size-mismatch"]["verdict"] == judged.REFUSED
    assert "new mel frames" in onnx["chunk-size-mismatch"]["detail"]
    assert onnx["empty"]["verdict"] in (judged.PASS, judged.REFUSED)
    assert _verdicts(data, "nemo:float32")["empty"]["verdict"] == judged.REFUSED  # no IndexError

    # Saved results re-judge: the verdicts follow the comparisons under a stricter tolerance file.
    results = Results.load(out)
    assert [v.to_dict() for v in judged.probe_verdicts(results)] == data["extra"]["probes"]["verdicts"]
    strict = tmp_path / "strict.toml"
    default = Path(judged.__file__).with_name("tolerances.toml")
    strict.write_text(default.read_text() + '\n[float32."nemo~onnx".encoder]\nmax_abs = 1e-12\n')
    rejudged = tmp_path / "rejudged.json"
    assert main(["judge", str(out), "--tolerances", str(strict), "--json", str(rejudged)]) == EXIT_VIOLATION
    capsys.readouterr()
    after = _verdicts(json.loads(rejudged.read_text()), "onnx:float32")
    assert after["leading-silence-0ms"]["verdict"] == judged.FAIL
    assert after["leading-silence-0ms"]["tap"] == "encoder" and after["leading-silence-0ms"]["step"] == 0
    assert after["chunk-size-mismatch"]["verdict"] == judged.REFUSED


class _Wrapped:
    """A candidate built on a working backend (its name kept, so its tolerances apply), with one defect."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)


class FirstChunkLoses90ms(_Wrapped):
    """The first chunk's first 9 mel frames (90 ms) replaced by digital silence's: sherpa-onnx's cold start."""

    def step(self, chunk, state, **options):
        import dataclasses

        if chunk.is_first:
            mel = chunk.mel.copy()
            start = chunk.cache_frames
            mel[:, :, start:start + 9] = np.float32(np.log(2.0 ** -24))  # log(0 + NeMo's log guard)
            chunk = dataclasses.replace(chunk, mel=mel)
        return self.inner.step(chunk, state, **options)


class KeepsCaches(_Wrapped):
    """Every new stream starts from the caches the previous stream ended with."""

    last = None

    def initial_state(self, context, batch_size=1, **options):
        import dataclasses

        state = self.inner.initial_state(context, batch_size, **options)
        if self.last is None or self.last.att_context_size != state.att_context_size:
            return state
        return dataclasses.replace(state, cache_last_channel=self.last.cache_last_channel,
                                   cache_last_time=self.last.cache_last_time,
                                   cache_last_channel_len=self.last.cache_last_channel_len)

    def step(self, chunk, state, **options):
        output = self.inner.step(chunk, state, **options)
        self.last = output.state
        return output


@pytest.mark.nemo
@pytest.mark.onnx
@pytest.mark.parametrize(("defect", "classes", "failing"), [
    # 90 ms of leading silence is not quite enough here: mel frame 8's 25 ms window reaches 2.5 ms into the speech.
    (FirstChunkLoses90ms, ["cold-start", "isolated-word"], {"leading-silence-0ms", "leading-silence-90ms"}),
    (KeepsCaches, ["state-reset"], {"reset-between-streams"}),
], ids=["first-chunk", "carried-state"])
def test_a_broken_candidate_fails_the_right_probe(defect, classes, failing, nemo_backend, onnx_backend, tiny_nemo,
                                                  tolerances):
    from streaming_parity.app.probes import run_probes

    run = run_probes(nemo_backend, [defect(onnx_backend)], probe_set(long_seconds=LONG, classes=classes), [CONTEXT],
                     tolerances, model_path=tiny_nemo)
    verdicts = {v.probe: v for v in run.verdicts if v.backend == "onnx:float32"}
    assert {name for name, v in verdicts.items() if v.verdict == judged.FAIL} == failing, verdicts
    assert not run.passed
    for name in failing:
        assert verdicts[name].step == 0 and verdicts[name].tap, verdicts[name]
    if defect is FirstChunkLoses90ms:
        assert verdicts["leading-silence-0ms"].tap == "pre_encode"
        assert verdicts["leading-silence-500ms"].verdict == judged.PASS


@pytest.mark.nemo
@pytest.mark.onnx
def test_a_long_stream_says_how_far_it_is_and_reports_time_and_memory_per_minute(nemo_backend, onnx_backend,
                                                                                 tiny_nemo, tolerances, monkeypatch):
    """A long probe's runs are spooled: each says how far it is while it streams, records the process's memory at
    every step, and the run reports each backend's time a step and memory per minute of audio."""
    from streaming_parity.app.probes import run_probes
    from streaming_parity.judge import spool
    from streaming_parity.report.data import probe_sections

    monkeypatch.setattr(spool, "PROGRESS_SECONDS", 0.0)  # a line at every step
    said = []
    run = run_probes(nemo_backend, [onnx_backend], probe_set(long_seconds=LONG, classes=["long-stream"]), [CONTEXT],
                     tolerances, model_path=tiny_nemo, progress=said.append)
    assert run.passed
    steps = {row["backend"]: len(row["step_seconds"]) for row in run.results.timings}
    assert set(steps) == {"nemo", "onnx"} and steps["nemo"] == steps["onnx"] > 10
    for row in run.results.timings:
        assert len(row["step_rss_mb"]) == len(row["step_seconds"]) and min(row["step_rss_mb"]) > 0
    for backend in ("nemo:float32", "onnx:float32"):
        lines = [line for line in said if f"{backend} [70,13] plain:" in line]
        assert len(lines) == steps[backend.split(":")[0]], said
        assert lines[-1].split(f"{backend} [70,13] plain: ")[1].startswith(f"{len(lines)} steps, ")
        assert "s a step over the last 1," in lines[-1] and "resident" in lines[-1]
    resources = {row["backend"]: row for row in run.results.extra["probes"]["resources"]}
    assert set(resources) == {"nemo:float32", "onnx:float32"}
    for row in resources.values():
        assert len(row["seconds_per_step"]) == len(row["peak_rss_mb"]) == 1  # a 12 s stream: one minute
        assert row["seconds_per_step"][0] > 0 and row["seconds_growth_per_minute"] is None
    section = probe_sections([run.results])[0]
    assert [r.backend for r in section.resources] == ["nemo:float32", "onnx:float32"]
    assert "resident MiB per minute" in section.resources[0].describe()


def _long_stream_results(step_seconds: list[float], step_rss_mb: list[float] | None):
    """Results of a long-stream probe at [70,0] (a step is 80 ms of audio: 750 steps a minute), with one run."""
    from streaming_parity.judge.results import Results

    timing = {"backend": "onnx", "dtype": "float32", "mode": "plain", "att_context_size": [70, 0],
              "utterance": "long-stream", "step_seconds": step_seconds}
    if step_rss_mb is not None:
        timing["step_rss_mb"] = step_rss_mb
    other = {**timing, "utterance": "a-short-probe"}  # not a long stream: not reported
    section = {"definitions": [{"name": "long-stream-180s", "long": True, "streams": [{"name": "long-stream"}]},
                               {"name": "short", "long": False, "streams": [{"name": "a-short-probe"}]}],
               "step_seconds": {"70,0": 0.08}}
    return Results(model={}, tolerances="", timings=[timing, other], extra={judged.KEY: section})


def test_error_growth_per_minute_for_the_worst_layer_each_layer_and_every_cache():
    """A layer's error per minute is reported twice: in the worst layer's row (whichever layer it is that minute)
    and, asked for (the results JSON), in its own row; caches and positions in theirs, in model order."""
    from streaming_parity.judge.compare import PairComparison, TapResult

    def tap(step: int, name: str, error: float, limit: float = 1e-4) -> TapResult:
        return TapResult(step, name, {"max_abs": error}, {"max_abs": limit}, [])

    # 1,500 steps of 80 ms = 2 minutes; layers.1 is the worst layer in minute 0, layers.0 in minute 1.
    taps = [tap(0, "layers.1", 3e-6), tap(0, "layers.0", 1e-6), tap(800, "layers.0", 5e-6, limit=2e-4),
            tap(800, "layers.1", 2e-6), tap(0, "encoder", 4e-6), tap(1499, "encoder", 4e-6),
            tap(0, "cache_last_channel_len", 0.0), tap(0, "joint", 1.0), tap(-1, "mel", 1.0)]
    results = _long_stream_results([0.1] * 1500, None)
    results.comparisons = [PairComparison("nemo", "onnx", "nemo~onnx", "float32", (70, 0), "long-stream", taps, [1],
                                          [1], [], mode="plain")]
    rows = judged.error_growth(results, per_layer=True)
    assert [r.tap for r in rows] == ["layers", "layers.0", "layers.1", "encoder", "cache_last_channel_len"]
    by_tap = {r.tap: r for r in rows}
    assert by_tap["layers"].per_minute == [3e-6, 5e-6] and by_tap["layers"].limit == 1e-4
    assert by_tap["layers.0"].per_minute == [1e-6, 5e-6] and by_tap["layers.1"].per_minute == [3e-6, 2e-6]
    assert by_tap["layers"].growth_per_minute == pytest.approx(2e-6)
    assert by_tap["encoder"].growth_per_minute == pytest.approx(0.0)
    assert [r.tap for r in judged.error_growth(results)] == ["layers", "encoder", "cache_last_channel_len"]
    summary = judged.growth_summary(rows)
    assert summary.startswith("2 min: layers [70,0] 3.0e-06->5.0e-06 (+2.0e-06/min)") and "positions exact" in summary


def test_resource_use_per_minute_and_its_growth():
    """Minute m holds steps [750 m, 750 (m + 1)): the mean time a step, the peak memory, and least-squares slopes
    (a stream that slows by 0.01 s a step and grows by 100 MiB every minute reads exactly that)."""
    seconds = [0.2] * 750 + [0.21] * 750 + [0.22] * 100
    rss = [1000.0] * 749 + [1050.0] + [1100.0] * 750 + [1200.0] * 100
    (row,) = judged.resource_use(_long_stream_results(seconds, rss))
    assert (row.probe, row.backend, row.context, row.mode) == ("long-stream-180s", "onnx:float32", [70, 0], "plain")
    assert row.seconds_per_step == pytest.approx([0.2, 0.21, 0.22])
    assert row.peak_rss_mb == [1050.0, 1100.0, 1200.0]
    assert row.seconds_growth_per_minute == pytest.approx(0.01)
    assert row.rss_growth_per_minute == pytest.approx(75.0)
    assert "growth +0.0100/min" in row.describe() and "resident MiB per minute 1050, 1100, 1200" in row.describe()
    # A run held in memory records no memory per step: its time a step alone.
    (row,) = judged.resource_use(_long_stream_results(seconds, None))
    assert row.peak_rss_mb is None and row.rss_growth_per_minute is None and "resident" not in row.describe()
    with pytest.raises(ValueError, match="1599 resident-memory samples for 1600 steps"):
        judged.resource_use(_long_stream_results(seconds, rss[:-1]))


@pytest.mark.nemo
def test_nightly_runs_the_probes_into_the_report(tiny_nemo, tmp_path, capsys):
    """``parity nightly --probes``: the probe results beside the night's, and a probe section in its report
    (NeMo alone here: its own refusals and runs; the candidates' part is the CLI test's)."""
    from streaming_parity.app.cli import EXIT_OK, main

    reports = tmp_path / "reports"
    assert main(["nightly", "--models", str(tiny_nemo), "--out", str(reports), "--backends", "nemo",
                 "--att-context", "70,13", "--utterances", "1", "--work-dir", str(tmp_path / "work"),
                 "--probes", "--probe-long-seconds", "2", "--date", "2025-01-01"]) == EXIT_OK
    capsys.readouterr()
    night = reports / "2025-01-01"
    data = json.loads((night / "results-probes.json").read_text())
    reference = _verdicts(data, "nemo:float32")
    assert reference["empty"]["verdict"] == judged.REFUSED
    assert reference["chunk-size-mismatch"]["verdict"] == judged.REFUSED
    assert reference["leading-silence-0ms"]["verdict"] == judged.NOT_APPLICABLE  # no candidate to compare
    markdown = (night / "report.md").read_text()
    assert "**Probes** (tiny-streaming, [70,13])" in markdown and "| tiny-input | empty | 🚫 refused |" in markdown
    assert 'id="probes"' in (night / "report.html").read_text()


@pytest.mark.nightly
@pytest.mark.nemo
@pytest.mark.onnx
def test_ten_minute_stream(tiny_nemo, onnx_export, tmp_path, capsys):
    """The long-stream probe at its full length (10 minutes, spooled to disk): every step within tolerance and the
    error's growth per minute reported for every cache and position (opt-in: --run-nightly)."""
    from streaming_parity.app.cli import EXIT_OK, main

    out = tmp_path / "long.json"
    assert main(["probes", str(tiny_nemo), "--onnx", str(onnx_export), "--att-context", "70,13",
                 "--class", "long-stream", "--json", str(out)]) == EXIT_OK, capsys.readouterr().out
    data = json.loads(out.read_text())
    growth = [g for g in data["extra"]["probes"]["growth"] if g["backend"] == "onnx:float32"]
    assert {g["tap"] for g in growth} == set(judged.GROWTH_TAPS) | {f"layers.{i}" for i in range(3)}
    assert all(len(g["per_minute"]) >= 10 for g in growth)
