"""The NeMo -> MLX weight mapping: one declarative table, read top to bottom, first match wins.

Every tensor of a NeMo FastConformer transducer checkpoint is either mapped by a rule below or
dropped by a named rule; anything else stops the conversion. Names in ``{braces}`` are fields:

==========  =====================================================================
field       matches
==========  =====================================================================
``{n}``     a layer or module index (digits)
``{conv}``  a conformer conv module with a 1-D kernel: pointwise_conv1/2, depthwise_conv
``{part}``  the first component of a module path: encoder, decoder or joint
``{speaker}`` a multitalker speaker-kernel ModuleDict: spk_kernels or bg_spk_kernels
``{path}``  the rest of a dotted name
==========  =====================================================================

Layouts follow parakeet-mlx's conventions (MLX convolutions are channels-last):

- ``conv2d``: ``nn.Conv2d`` OIHW -> OHWI (``transpose(0, 2, 3, 1)``)
- ``conv1d``: ``nn.Conv1d`` OIK -> OKI (``transpose(0, 2, 1)``), the conformer convolutions and a hybrid
  model's CTC head (``ctc_decoder.decoder_layers.0``)
- ``lstm bias``: MLX keeps one LSTM bias: ``bias_ih + bias_hh``
- ``squeeze batch``: the filterbank buffer ``[1, n_mels, bins]`` -> ``[n_mels, bins]``

Module indices are copied, never assumed: NeMo's joint is ``Sequential(act, [Dropout], Linear)``,
so its output layer is ``joint.joint_net.2`` or ``joint.joint_net.1`` depending on the dropout;
the MLX model builds the same index from the config, and a mismatch is caught by the shape and
name checks (``streaming_parity/backends/mlx/convert.py``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from streaming_parity.backends.mlx.artifact import FRONTEND_FILE, MODEL_FILE

FIELDS = {
    "n": r"\d+",
    "conv": r"pointwise_conv1|pointwise_conv2|depthwise_conv",
    "part": r"encoder|decoder|joint",
    "speaker": r"spk_kernels|bg_spk_kernels",
    "path": r".+",
}



@dataclass(frozen=True)
class Layout:
    """A tensor layout change and its exact inverse (used by the round-trip test)."""

    name: str
    forward: Callable[[np.ndarray], np.ndarray]
    inverse: Callable[[np.ndarray], np.ndarray]


UNCHANGED = Layout("unchanged", lambda a: a, lambda a: a)
CONV2D_OHWI = Layout("conv2d OIHW -> OHWI", lambda a: a.transpose(0, 2, 3, 1), lambda a: a.transpose(0, 3, 1, 2))
CONV1D_OKI = Layout("conv1d OIK -> OKI", lambda a: a.transpose(0, 2, 1), lambda a: a.transpose(0, 2, 1))
SQUEEZE_BATCH = Layout("squeeze batch axis", lambda a: a.reshape(a.shape[1:]), lambda a: a[None])
LSTM_BIAS_SUM = Layout("lstm bias = bias_ih + bias_hh", lambda a: a, lambda a: a)  # combined by the converter


@dataclass(frozen=True)
class Rule:
    """``sources`` (one name, or two for a sum) -> ``target`` in ``file``; ``target`` None drops the tensor."""

    name: str
    sources: tuple[str, ...]
    target: str | None
    layout: Layout = UNCHANGED
    file: str = MODEL_FILE
    reason: str = ""  # why a tensor is dropped

    @property
    def is_drop(self) -> bool:
        return self.target is None

    @property
    def is_sum(self) -> bool:
        return len(self.sources) > 1


def rename(name: str, source: str, target: str, *, layout: Layout = UNCHANGED, file: str = MODEL_FILE) -> Rule:
    return Rule(name, (source,), target, layout, file)


def drop(name: str, source: str, reason: str) -> Rule:
    return Rule(name, (source,), None, reason=reason)


# The table. First matching rule wins, so specific rules come before the catch-all at the end.
MAPPING: tuple[Rule, ...] = (
    # Front end: the window and Slaney filterbank are kept exactly; everything else is recomputed.
    rename("front-end window", "preprocessor.featurizer.window", "window", file=FRONTEND_FILE),
    rename("front-end mel filterbank", "preprocessor.featurizer.fb", "filterbank", layout=SQUEEZE_BATCH,
           file=FRONTEND_FILE),
    drop("other preprocessor buffers", "preprocessor.{path}",
         "the MLX front end derives nothing else from the checkpoint"),
    drop("batch-norm step counters", "{path}.num_batches_tracked", "training bookkeeping, unused in eval mode"),
    # Convolutions: channels-last in MLX.
    rename("subsampling convolutions", "encoder.pre_encode.conv.{n}.weight", "encoder.pre_encode.conv.{n}.weight",
           layout=CONV2D_OHWI),
    rename("conformer pointwise/depthwise convolutions", "encoder.layers.{n}.conv.{conv}.weight",
           "encoder.layers.{n}.conv.{conv}.weight", layout=CONV1D_OKI),
    # Prediction-network LSTM: parakeet-mlx's Wx / Wh / single bias per layer.
    rename("LSTM input weights", "decoder.prediction.dec_rnn.lstm.weight_ih_l{n}",
           "decoder.prediction.dec_rnn.lstm.{n}.Wx"),
    rename("LSTM recurrent weights", "decoder.prediction.dec_rnn.lstm.weight_hh_l{n}",
           "decoder.prediction.dec_rnn.lstm.{n}.Wh"),
    Rule("LSTM biases", ("decoder.prediction.dec_rnn.lstm.bias_ih_l{n}", "decoder.prediction.dec_rnn.lstm.bias_hh_l{n}"),
         "decoder.prediction.dec_rnn.lstm.{n}.bias", LSTM_BIAS_SUM),
    # Multitalker models: target- and background-speaker kernels (Linear, ReLU, Dropout, Linear) per
    # layer, outside the encoder in NeMo (SpeakerKernelMixin). Named separately so that a swap of
    # the two ModuleDicts is a mapping fact the detection tools can name.
    rename("speaker kernels (multitalker)", "{speaker}.{n}.{path}", "{speaker}.{n}.{path}"),
    # Hybrid RNNT-CTC models: the CTC head, ConvASRDecoder's kernel-1 Conv1d(d_model, V + 1), keeps
    # NeMo's name and becomes an MLX Conv1d (OKI), as parakeet-mlx lays out its CTC decoder.
    rename("CTC head convolution (hybrid RNNT-CTC)", "ctc_decoder.decoder_layers.{n}.weight",
           "ctc_decoder.decoder_layers.{n}.weight", layout=CONV1D_OKI),
    rename("CTC head bias (hybrid RNNT-CTC)", "ctc_decoder.{path}", "ctc_decoder.{path}"),
    # Prompt-conditioned models (Nemotron-3.5): prompt_kernel = Sequential(Linear, ReLU, Linear) on the
    # encoder output and the locale's one-hot, top-level in NeMo (PromptStreamingMixin); Linears keep
    # torch's [out, in] layout in MLX, as every other Linear here.
    rename("prompt kernel (prompt-conditioned)", "prompt_kernel.{n}.{path}", "prompt_kernel.{n}.{path}"),
    # Everything else keeps its name and layout: linear layers, norms, attention biases, embedding,
    # subsampling output projection, joint.
    rename("linear layers, norms, attention biases, embedding", "{part}.{path}", "{part}.{path}"),
)


def _compile(template: str) -> re.Pattern:
    pattern, position = "", 0
    for match in re.finditer(r"\{(\w+)\}", template):
        pattern += re.escape(template[position:match.start()])
        pattern += f"(?P<{match.group(1)}>{FIELDS[match.group(1)]})"
        position = match.end()
    return re.compile(pattern + re.escape(template[position:]) + r"\Z")


_SOURCE_PATTERNS = {rule: [_compile(source) for source in rule.sources] for rule in MAPPING}
_TARGET_PATTERNS = {rule: _compile(rule.target) for rule in MAPPING if not rule.is_drop}


@dataclass(frozen=True)
class Match:
    rule: Rule
    source: str
    target: str | None  # None when dropped
    part: int  # which of the rule's sources matched (0 or 1 for a sum)

    @property
    def partner_sources(self) -> tuple[str, ...]:
        """All source names that together make ``target`` (two for a summed LSTM bias)."""
        fields = _SOURCE_PATTERNS[self.rule][self.part].match(self.source).groupdict()
        return tuple(template.format(**fields) for template in self.rule.sources)


def match_source(name: str) -> Match | None:
    """The first rule that maps or drops the NeMo tensor ``name``; None if no rule does."""
    for rule in MAPPING:
        for part, pattern in enumerate(_SOURCE_PATTERNS[rule]):
            found = pattern.match(name)
            if found:
                target = None if rule.is_drop else rule.target.format(**found.groupdict())
                return Match(rule, name, target, part)
    return None


def match_target(name: str, file: str) -> tuple[Rule, tuple[str, ...]]:
    """Inverse lookup: the rule that produced ``name`` in ``file`` and the NeMo names it came from."""
    for rule in MAPPING:
        if rule.is_drop or rule.file != file:
            continue
        found = _TARGET_PATTERNS[rule].match(name)
        if found:
            sources = tuple(template.format(**found.groupdict()) for template in rule.sources)
            # The catch-all must not claim a name a specific rule produces (e.g. an LSTM ".Wx").
            if all(match_source(source) is not None and match_source(source).rule is rule for source in sources):
                return rule, sources
    raise KeyError(f"no mapping rule produces {file}:{name}")


def to_nemo(name: str, array: np.ndarray, file: str = MODEL_FILE) -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
    """Map one MLX tensor back to NeMo's name(s) and layout.

    A summed LSTM bias maps back to ``(bias_ih, bias_hh)`` with their sum: the split is not
    recoverable, so the round trip checks the sum.
    """
    rule, sources = match_target(name, file)
    yield sources, rule.layout.inverse(array)


def describe() -> str:
    """The table as text (``parity convert --show-mapping``)."""
    lines = []
    for rule in MAPPING:
        sources = " + ".join(rule.sources)
        if rule.is_drop:
            lines.append(f"{rule.name:52s} {sources}  -> dropped ({rule.reason})")
        else:
            where = "" if rule.file == MODEL_FILE else f" [{rule.file}]"
            lines.append(f"{rule.name:52s} {sources}  -> {rule.target}{where}  ({rule.layout.name})")
    return "\n".join(lines)
