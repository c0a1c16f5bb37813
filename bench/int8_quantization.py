"""Dynamic int8 quantization schemes side by side, on this CPU's int8 kernel path.

    python bench/int8_quantization.py                            # tiny-streaming, every scheme, every lookahead
    python bench/int8_quantization.py --model tiny-hybrid --utterances 4
    python bench/int8_quantization.py --model path/to/model.nemo --att-context 70,13 --json out.json

The fixture (or ``.nemo``) is exported once in float32 (``parity export-onnx``'s graphs, cached under
``--work-dir``); each scheme then quantizes those same graphs with ``quantize_dynamic`` (encoders:
``MatMul``/``Gemm``; ``decoder_joint``: ``MatMul``/``Gemm``/``LSTM``, as the export does) and streams the
fixture utterances through ONNX Runtime in pad-and-drop mode. Every step of every tap it produces
(encoder, both caches, joint, a hybrid's ctc, a prompted model's prompt) is compared with the float32
graphs' own run; the joint rows are teacher-forced with the float32 decisions so that they stay
comparable after a flipped label. Token agreement is the free-running transcript's.

What it prints per scheme: the worst step of each tap (lowest cosine, highest rel_l2 and max_abs),
identical transcripts, the median time per chunk, and the int8 kernel path of this CPU
(``streaming_parity.core.system.cpu``): the figures of a saturating scheme differ between paths, those of an exact
one do not. Nothing is asserted; ``--json`` keeps the figures with the machine's description.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from streaming_parity.core.system.threads import limit_threads  # noqa: E402

SCHEMES = {
    "qint8": ("QInt8", False, False),
    "qint8-rr": ("QInt8", False, True),
    "quint8": ("QUInt8", False, False),
    "qint8-pc": ("QInt8", True, False),
    "qint8-pc-rr": ("QInt8", True, True),
    "quint8-pc": ("QUInt8", True, False),
}
WORST = {"cosine": min, "rel_l2": max, "max_abs": max}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-streaming", help="fixture name or .nemo path (default tiny-streaming)")
    parser.add_argument("--att-context", action="append", default=None, metavar="L,R",
                        help="lookahead(s) to run (default: every lookahead of the model)")
    parser.add_argument("--schemes", default=",".join(SCHEMES), help=f"comma-separated, from {', '.join(SCHEMES)}")
    parser.add_argument("--utterances", type=int, default=10, help="fixture utterances to stream (default 10)")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads (default 1)")
    parser.add_argument("--work-dir", default=str(REPO / ".cache" / "bench"), help="where the fp32 export is cached")
    parser.add_argument("--json", default=None, help="write the figures here")
    parser.add_argument("--matmul-repeat", type=int, default=200,
                        help="also time one full-size MatMul per scheme this many times (0: skip)")
    args = parser.parse_args(argv)
    unknown = [s for s in args.schemes.split(",") if s not in SCHEMES]
    if unknown:
        parser.error(f"unknown scheme(s) {', '.join(unknown)}; known: {', '.join(SCHEMES)}")
    return args


def _model_path(name: str) -> Path:
    path = Path(name)
    if path.suffix == ".nemo":
        if not path.is_file():
            raise SystemExit(f"{path}: no such .nemo")
        return path
    from streaming_parity.fixtures.models import build

    return build(name, progress=lambda text: print(f"  {text}", file=sys.stderr))


def measure(args: argparse.Namespace) -> dict:
    from streaming_parity.backends.onnx.export import export_cached, write_int8_variant
    from streaming_parity.backends.onnx.quantization import QuantScheme
    from streaming_parity.backends.onnx.runtime import OnnxBackend
    from streaming_parity.core.system.cpu import int8_kernel_path
    from streaming_parity.fixtures.models import speech_manifest
    from streaming_parity.interface.driver import stream
    from streaming_parity.interface.utterance import Utterance
    from streaming_parity.judge.compare import compare_runs
    from streaming_parity.judge.forcing import reference_decisions
    from streaming_parity.judge.tolerances import Tolerances

    nemo = _model_path(args.model)
    contexts = [tuple(int(v) for v in c.split(",")) for c in args.att_context] if args.att_context else None
    print(f"exporting {nemo.name} in float32 (cached under {args.work_dir})", file=sys.stderr)
    fp32_dir = export_cached(nemo, Path(args.work_dir), att_context_sizes=contexts, int8=False, debug_taps=False)
    reference = OnnxBackend(fp32_dir, taps=False, threads=args.threads)
    contexts = list(reference.info.att_context_sizes)
    entries = speech_manifest()[: args.utterances]
    utterances = [Utterance.from_file(e["audio_filepath"], e.get("text")) for e in entries]
    prompt = reference.info.default_prompt
    tolerances = Tolerances.load()
    runs = {}
    for utterance in utterances:
        mel, _ = reference.features(utterance.audio[None])
        for context in contexts:
            runs[(utterance.name, context)] = (mel, stream(reference, mel, context, "pad-and-drop", prompt=prompt))
    path = int8_kernel_path()
    figures = {"model": nemo.name, "int8_kernel_path": path.to_dict(), "machine": platform.processor() or platform.machine(),
               "threads": args.threads, "contexts": [list(c) for c in contexts], "utterances": len(utterances),
               "schemes": {}}
    with tempfile.TemporaryDirectory(prefix="int8-bench-") as scratch:
        for key in args.schemes.split(","):
            weight_type, per_channel, reduce_range = SCHEMES[key]
            scheme = QuantScheme(weight_type, per_channel=per_channel, reduce_range=reduce_range)
            print(f"{scheme.label}: quantizing and streaming", file=sys.stderr)
            out_dir = Path(scratch) / key
            write_int8_variant(fp32_dir, out_dir, scheme)
            worst: dict[str, dict[str, float]] = {}
            identical, seconds = 0, []
            with OnnxBackend(out_dir, dtype="int8", threads=args.threads) as int8:
                for (_utterance, context), (mel, ref_run) in runs.items():
                    free = stream(int8, mel, context, "pad-and-drop", dtype="int8", prompt=prompt)
                    forced = stream(int8, mel, context, "pad-and-drop", dtype="int8", prompt=prompt,
                                    forced_decisions=reference_decisions(ref_run))
                    identical += free.tokens == ref_run.tokens
                    seconds += list(free.step_seconds)
                    comparison = compare_runs(ref_run, forced, tolerances, num_layers=reference.info.num_layers,
                                              pair="nemo~onnx")  # the int8 tables; only the metrics are read here
                    for tap in comparison.taps:
                        if not tap.metrics or tap.tap == "cache_last_channel_len":
                            continue
                        row = worst.setdefault(tap.tap, {})
                        for metric, pick in WORST.items():
                            if metric in tap.metrics:
                                row[metric] = pick(row.get(metric, tap.metrics[metric]), tap.metrics[metric])
            figures["schemes"][key] = {"label": scheme.label, "worst": worst, "identical": identical,
                                       "runs": len(runs), "median_step_ms": 1e3 * statistics.median(seconds)}
    reference.close()
    return figures


def matmul_speed(args: argparse.Namespace, shapes=((120, 1024, 4096), (120, 4096, 1024), (1, 640, 2560))) -> dict:
    """The kernel alone: one ``MatMul`` of full-size Nemotron shapes (a [70,13] chunk's 120 frames through the
    feed-forward module's 1024 -> 4096 -> 1024; one prediction-net step's 640 -> 4 x 640), quantized under each
    scheme, timed over ``--matmul-repeat`` runs (median ms). This is where the weight type changes the kernel."""
    import time

    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from streaming_parity.backends.onnx.quantization import QuantScheme

    rng = np.random.default_rng(0)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    out: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="int8-matmul-") as scratch:
        for rows, inner, cols in shapes:
            weight = (rng.standard_normal((inner, cols)) / np.sqrt(inner)).astype(np.float32)
            graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "matmul",
                                      [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, inner])],
                                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, cols])],
                                      [numpy_helper.from_array(weight, "w")])
            source = Path(scratch) / f"matmul-{rows}x{inner}x{cols}.onnx"
            onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(source))
            x = rng.standard_normal((rows, inner)).astype(np.float32)
            for key in args.schemes.split(","):
                weight_type, per_channel, reduce_range = SCHEMES[key]
                scheme = QuantScheme(weight_type, per_channel=per_channel, reduce_range=reduce_range)
                from onnxruntime.quantization import quantize_dynamic

                target = source.with_suffix(f".{key}.onnx")
                quantize_dynamic(str(source), str(target), op_types_to_quantize=["MatMul"], **scheme.options())
                session = ort.InferenceSession(str(target), options, providers=["CPUExecutionProvider"])
                session.run(None, {"x": x})
                times = []
                for _ in range(args.matmul_repeat):
                    started = time.perf_counter()
                    session.run(None, {"x": x})
                    times.append(time.perf_counter() - started)
                out.setdefault(scheme.label, {})[f"{rows}x{inner}x{cols}"] = 1e3 * statistics.median(times)
    return out


def print_table(figures: dict) -> None:
    path = figures["int8_kernel_path"]
    print(f"\n{figures['model']}: int8 kernel path {path['name']} (flags {' '.join(path['flags']) or 'none'}), "
          f"{figures['threads']} thread(s), {figures['utterances']} utterances x {len(figures['contexts'])} lookaheads, "
          "worst step against the float32 graphs")
    taps = sorted({t for s in figures["schemes"].values() for t in s["worst"]},
                  key=lambda t: ["encoder", "cache_last_channel", "cache_last_time", "prompt", "ctc", "joint"].index(t)
                  if t in ("encoder", "cache_last_channel", "cache_last_time", "prompt", "ctc", "joint") else 99)
    header = f"{'scheme':<26}" + "".join(f"{t + ' cos / rel_l2 / max_abs':>40}" for t in taps) + f"{'same text':>11}{'ms/chunk':>10}"
    print(header)
    for s in figures["schemes"].values():
        cells = ""
        for tap in taps:
            w = s["worst"].get(tap, {})
            cells += f"{w.get('cosine', float('nan')):>14.6f} / {w.get('rel_l2', float('nan')):.4f} / {w.get('max_abs', float('nan')):.4f}"
        print(f"{s['label']:<26}{cells}{s['identical']:>7}/{s['runs']:<3}{s['median_step_ms']:>10.2f}")


def main(argv=None) -> int:
    args = parse_args(argv)
    limit_threads(args.threads)
    figures = measure(args)
    print_table(figures)
    if args.matmul_repeat:
        figures["matmul_ms"] = matmul_speed(args)
        print(f"\nMatMul alone, median ms over {args.matmul_repeat} runs ({args.threads} thread(s)):")
        for label, row in figures["matmul_ms"].items():
            print(f"{label:<32}" + "".join(f"{shape:>16} {ms:7.3f}" for shape, ms in row.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
