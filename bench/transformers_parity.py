"""transformers against NeMo, per lookahead and dtype: per-layer error at every step, transcripts, WER.

    python bench/transformers_parity.py                            # trained-streaming, 40 test utterances
    python bench/transformers_parity.py --model tiny-streaming     # the fixture speech (no WER: random weights)
    python bench/transformers_parity.py --json out.json

The ``.nemo`` is written as a transformers checkpoint (``parity export-transformers``) and run four ways per
lookahead and dtype, beside NeMo streaming in plain mode on the same mel:

- ``driver``: transformers' model fed NeMo's mel chunks with its own caches (``transformers`` backend), every
  tap compared with NeMo's; the worst max_abs per tap kind is taken over the steps whose frame counts agree,
  and the steps whose frame counts differ are counted;
- ``driver + right pad``: the same with NeMo's right padding added to transformers' streaming subsampling on
  the final partial chunk (``transformers-generate``'s ``final-chunk-right-pad`` correction);
- ``generate``: transformers' processor and streaming ``generate()`` as its documentation streams
  (``transformers-generate``), whose generator never feeds the final partial chunk.

Printed per lookahead: WER against the references (the trained fixture), utterances whose tokens equal NeMo's,
and the per-tap worst error. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from streaming_parity.core.system.threads import limit_threads  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="trained-streaming", help="trained-streaming or a fixture name")
    parser.add_argument("--utterances", type=int, default=40, help="held-out utterances of the trained fixture")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--att-context", action="append", default=None, metavar="L,R")
    parser.add_argument("--work", type=Path, default=REPO / ".cache" / "bench")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args(argv)


def _utterances(model: str, count: int):
    from streaming_parity.interface.utterance import Utterance

    if model == "trained-streaming":
        from streaming_parity.fixtures.trained.evaluate import test_entries

        nemo = REPO / "streaming_parity/fixtures/trained/trained-streaming.nemo"
        return nemo, [Utterance.from_file(e["audio_filepath"], e["text"]) for e in test_entries()[:count]]
    from streaming_parity.app.session import fixture_utterances
    from streaming_parity.fixtures.models import build

    return build(model, progress=lambda _m: None), fixture_utterances()


def _taps_worst(reference_steps, candidate_steps, worst: dict[str, float]) -> int:
    """Fold each tap's max_abs into ``worst`` over the steps whose shapes agree; the steps that differ."""
    differing = 0
    for ref, cand in zip(reference_steps, candidate_steps):
        a, b = ref.taps_and_caches(), cand.taps_and_caches()
        if a["encoder"].shape != b["encoder"].shape:
            differing += 1
            continue
        for name, value in a.items():
            if name in b and value.shape == b[name].shape and value.size:
                kind = name.split(".")[0] if not name.startswith("layers.") else name
                error = float(np.max(np.abs(value.astype(np.float64) - b[name].astype(np.float64))))
                worst[kind] = max(worst.get(kind, 0.0), error)
    return differing + abs(len(reference_steps) - len(candidate_steps))


def main(argv=None) -> int:
    args = parse_args(argv)
    limit_threads(args.threads)
    from streaming_parity.backends.transformers.export import export_transformers
    from streaming_parity.core.errors import Unsupported
    from streaming_parity.interface.chunking import ChunkSchedule
    from streaming_parity.interface.decoding import decode_tokens
    from streaming_parity.interface.registry import get
    from streaming_parity.judge.metrics import word_error_rate

    nemo_path, utterances = _utterances(args.model, args.utterances)
    directory = args.work / f"transformers-{args.model}"
    if not (directory / "config.json").is_file():
        export_transformers(nemo_path, directory)
    reference = get("nemo").load(nemo_path)
    contexts = ([tuple(int(x) for x in c.split(",")) for c in args.att_context] if args.att_context
                else list(reference.info.att_context_sizes))
    texts = [u.text for u in utterances]
    has_texts = all(texts)
    vocabulary = reference.info.vocabulary
    report: dict = {"model": args.model, "utterances": len(utterances), "contexts": {}}
    runs: dict = {}
    mels = {u.name: reference.features(u.audio[None])[0] for u in utterances}  # the driver gets NeMo's chunks
    for context in contexts:
        runs[context] = {"nemo": {}}
        for u in utterances:
            chunks = ChunkSchedule(reference.streaming_config(context), "plain").chunks(mels[u.name])
            state, steps = reference.initial_state(context), []
            for chunk in chunks:
                out = reference.step(chunk, state)
                state = out.state
                steps.append(out)
            runs[context]["nemo"][u.name] = steps
    reference.close()
    for dtype in args.dtypes.split(","):
        runtime = get("transformers-generate").load(directory, dtype=dtype)
        driver = runtime.driver
        for context in contexts:
            entry = report["contexts"].setdefault(f"{context[0]},{context[1]}", {})
            nemo_tokens = {n: [t for s in steps for t in s.tokens[0]] for n, steps in runs[context]["nemo"].items()}
            if "nemo" not in entry:
                entry["nemo"] = {"wer": word_error_rate(texts, [decode_tokens(vocabulary, nemo_tokens[u.name])
                                                                for u in utterances]) if has_texts else None}
            variants = {}
            for variant in ("driver", "driver + right pad", "generate"):
                worst, differing, tokens = {}, 0, {}
                for u in utterances:
                    reference_steps = runs[context]["nemo"][u.name]
                    if variant == "generate":
                        try:
                            steps = list(runtime.stream_audio(u.audio[None], context))
                        except Unsupported as refused:
                            variants[variant] = {"refused": str(refused)}
                            break
                        tokens[u.name] = [t for s in steps for t in s.tokens[0]]
                        continue
                    chunks = ChunkSchedule(driver.streaming_config(context), "plain").chunks(mels[u.name])
                    state, steps = driver.initial_state(context), []
                    for chunk in chunks:
                        final_partial = chunk.is_last and not chunk.is_first and chunk.num_new_frames % 8
                        padded = (runtime._right_padded_subsampling() if variant == "driver + right pad"
                                  and final_partial else contextlib.nullcontext())
                        with padded:
                            out = driver.step(chunk, state)
                        state = out.state
                        steps.append(out)
                    tokens[u.name] = [t for s in steps for t in s.tokens[0]]
                    differing += _taps_worst(reference_steps, steps, worst)
                if variant in variants:  # refused
                    print(f"[{context[0]},{context[1]}] {dtype} {variant}: {json.dumps(variants[variant])}", flush=True)
                    continue
                hypotheses = [decode_tokens(vocabulary, tokens[u.name]) for u in utterances]
                variants[variant] = {
                    "wer": word_error_rate(texts, hypotheses) if has_texts else None,
                    "same_tokens": sum(tokens[u.name] == nemo_tokens[u.name] for u in utterances),
                    "refused_short": len(runtime.refused_short) if variant == "generate" else None,
                    "steps_with_other_frames": differing if variant != "generate" else None,
                    "worst_max_abs": worst or None}
                print(f"[{context[0]},{context[1]}] {dtype} {variant}: {json.dumps(variants[variant])}", flush=True)
            entry[dtype] = variants
        runtime.close()
    for name, entry in report["contexts"].items():
        print(f"[{name}] NeMo WER {entry['nemo']['wer']}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
