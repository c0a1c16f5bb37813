"""A transformers checkpoint directory of either Nemotron family, read without transformers (``config.json``,
``processor_config.json``, ``model.safetensors``' header), and checked against a ``.nemo``.

``describe`` says what a directory is (detection); ``HfDirectory.nemo_encoder_section`` restates its encoder as
the NeMo encoder section it implies, so that the harness derives the same chunk schedule from it; and
``check_against_nemo`` holds every value the directory states, and every tensor it holds, to the ``.nemo``:

- a config or processor value that contradicts the ``.nemo`` is one line naming the file, the key and both
  values (``contradictions``); a ``.nemo`` setting transformers cannot express is one too;
- every tensor of ``model.safetensors`` is compared with the NeMo tensor it stands for
  (``naming.hf_name``), exactly; a difference is named with its tensor, the NeMo tensor, the tap it feeds and
  what it looks like (a transposed kernel, LSTM gates in another order, scaled); a parameter of the model that
  the file lacks is one ``from_pretrained`` leaves at its initial value (it only warns), and one the file has
  that the model does not is ignored by it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from streaming_parity.backends.transformers import naming
from streaming_parity.core.errors import InputNotFound, InvalidInput
from streaming_parity.core.safe_files import read_safetensors_header

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
PROCESSOR = "processor_config.json"
TOKENIZER = "tokenizer.json"
REQUIRED = (CONFIG, WEIGHTS, PROCESSOR, TOKENIZER)
LSTM_GATES = ("input", "forget", "cell", "output")  # torch.nn.LSTM's row blocks (NeMo's too)
# Fields that only matter in training: stated by the writer, not held to the .nemo.
_TRAINING_ONLY = {"dropout", "dropout_positions", "attention_dropout", "activation_dropout", "layerdrop"}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise InvalidInput(f"{path}: not readable JSON ({error})") from None
    if not isinstance(data, dict):
        raise InvalidInput(f"{path}: expected a JSON object")
    return data


def describe(path: Path) -> str | None:
    """``transformers <model_type>`` for a directory of either family, else None (file names and model_type)."""
    path = Path(path)
    if not (path.is_dir() and all((path / name).is_file() for name in (CONFIG, WEIGHTS))):
        return None
    try:
        model_type = json.loads((path / CONFIG).read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    return f"transformers {model_type}" if model_type in naming.FAMILIES else None


@dataclass
class HfDirectory:
    path: Path
    config: dict[str, Any]
    processor: dict[str, Any]

    @classmethod
    def read(cls, path: str | Path) -> HfDirectory:
        path = Path(path)
        missing = [name for name in REQUIRED if not (path / name).is_file()]
        if missing:
            raise InputNotFound(f"{path}: not a transformers checkpoint of a Nemotron ASR model (missing "
                                f"{', '.join(missing)}); write one with `parity export-transformers MODEL --out {path}`")
        config = _read_json(path / CONFIG)
        if config.get("model_type") not in naming.FAMILIES:
            raise InvalidInput(f"{path / CONFIG}: model_type {config.get('model_type')!r} is not one of "
                               f"{', '.join(naming.FAMILIES)}")
        read_safetensors_header(path / WEIGHTS)  # a header that lies about its sizes is refused before torch reads it
        return cls(path, config, _read_json(path / PROCESSOR))

    @property
    def family(self) -> str:
        return self.config["model_type"]

    @property
    def encoder(self) -> dict[str, Any]:
        return self.config.get("encoder_config") or {}

    @property
    def feature_extractor(self) -> dict[str, Any]:
        return self.processor.get("feature_extractor") or {}

    def lookaheads(self) -> list[int]:
        supported = self.processor.get("supported_num_lookahead_tokens")
        if supported is None:  # the processor's own default set (processing_nemotron_asr_streaming.py)
            supported = [13, 6, 1, 0]
        return [int(r) for r in supported]

    def att_context_sizes(self) -> list[list[int]]:
        left = int(self.encoder.get("sliding_window", 71)) - 1
        return [[left, right] for right in self.lookaheads()]

    def nemo_encoder_section(self) -> dict[str, Any]:
        """The NeMo encoder section this directory's encoder implements (always causal dw_striding with a
        layer-norm causal conv module and chunked_limited attention: what the transformers classes build)."""
        encoder = self.encoder
        return {
            "feat_in": int(encoder.get("num_mel_bins", 80)), "n_layers": int(encoder.get("num_hidden_layers", 24)),
            "d_model": int(encoder.get("hidden_size", 1024)), "n_heads": int(encoder.get("num_attention_heads", 8)),
            "subsampling": "dw_striding", "subsampling_factor": int(encoder.get("subsampling_factor", 8)),
            "subsampling_conv_channels": int(encoder.get("subsampling_conv_channels", 256)),
            "causal_downsampling": True, "att_context_size": self.att_context_sizes(),
            "att_context_style": "chunked_limited", "conv_kernel_size": int(encoder.get("conv_kernel_size", 9)),
            "conv_context_size": "causal", "conv_norm_type": "layer_norm",
            "xscaling": bool(encoder.get("scale_input", True)),
        }

    def prompt_dictionary(self) -> dict[str, int]:
        return {str(k): int(v) for k, v in (self.processor.get("prompt_dictionary") or {}).items()}

    def tensor_names(self) -> dict[str, tuple[int, ...]]:
        header = json.loads(_header_bytes(self.path / WEIGHTS))
        return {name: tuple(entry["shape"]) for name, entry in header.items() if name != "__metadata__"}


def _header_bytes(path: Path) -> bytes:
    with open(path, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        return handle.read(size)


# -- checks against the .nemo ------------------------------------------------------------------------------

def tap_fed_by(hf_tensor: str) -> str:
    """The first tap (model order) that a transformers parameter feeds."""
    if hf_tensor.startswith("encoder.subsampling."):
        return "pre_encode"
    if hf_tensor.startswith("encoder.layers."):
        return "layers." + hf_tensor.split(".")[2]
    if hf_tensor.startswith("prompt_projector."):
        return "prompt"
    if hf_tensor.startswith(("decoder.embedding.", "decoder.lstm.")):
        return "decoder"
    return "joint"


@dataclass(frozen=True)
class TensorDifference:
    hf_name: str
    nemo_name: str | None
    what: str

    def text(self) -> str:
        source = f" (from {self.nemo_name})" if self.nemo_name else ""
        return f"{self.hf_name}{source}, feeds tap {tap_fed_by(self.hf_name)}: {self.what}"


@dataclass
class NemoCheck:
    contradictions: list[str] = field(default_factory=list)
    tensors: list[TensorDifference] = field(default_factory=list)
    compared: int = 0

    def lines(self) -> list[str]:
        lines = [f"contradicts the .nemo: {c}" for c in self.contradictions]
        lines += [f"tensor {d.text()}" for d in self.tensors]
        if not lines:
            lines.append(f"every config value and all {self.compared} tensors equal the .nemo's")
        return lines


def describe_difference(ours: np.ndarray, source: np.ndarray, name: str) -> str:
    """What a tensor that differs from its source looks like: another shape, the source transposed, LSTM gate
    blocks in another order, the source scaled, or else by how much."""
    if ours.shape != source.shape:
        if ours.shape == source.T.shape and np.array_equal(ours, source.T):
            return f"the .nemo's tensor transposed (shape {source.shape} -> {ours.shape})"
        return f"shape {ours.shape}, the .nemo's is {source.shape}"
    if ours.ndim >= 2 and ours.shape[0] == ours.shape[1] and np.array_equal(ours, np.swapaxes(source, 0, 1)):
        return f"the .nemo's tensor with its first two axes swapped (a transposed {ours.shape[0]}x{ours.shape[1]} kernel)"
    if ".lstm." in name and ours.shape[0] % 4 == 0:
        blocks = ours.shape[0] // 4
        ours_blocks = [ours[i * blocks:(i + 1) * blocks] for i in range(4)]
        source_blocks = [source[i * blocks:(i + 1) * blocks] for i in range(4)]
        order = []
        for block in ours_blocks:
            match = [j for j, candidate in enumerate(source_blocks) if np.array_equal(block, candidate)]
            order.append(match[0] if match else None)
        if None not in order and order != [0, 1, 2, 3]:
            moved = ", ".join(f"{LSTM_GATES[i]} gate holds the .nemo's {LSTM_GATES[j]}"
                              for i, j in enumerate(order) if i != j)
            return f"LSTM gate blocks in another order ({moved})"
    scale = float(np.vdot(ours, source) / max(np.vdot(source, source), 1e-30))
    residual = float(np.max(np.abs(ours - scale * source)))
    if abs(scale - 1.0) > 1e-6 and residual <= 1e-6 * max(float(np.max(np.abs(ours))), 1e-30):
        return f"the .nemo's tensor scaled by {scale:.6g}"
    difference = np.abs(ours.astype(np.float64) - source.astype(np.float64))
    return f"max_abs {float(difference.max()):.3g} from the .nemo's ({int(np.count_nonzero(difference))} of {ours.size} values differ)"


def check_config(directory: HfDirectory, nemo_config, raw_config: Mapping[str, Any], vocabulary: Sequence[str],
                 checkpoint: Mapping[str, Any]) -> list[str]:
    """Every value the directory's ``config.json`` and ``processor_config.json`` state that bears on the
    computation, against the ``.nemo``'s."""
    from streaming_parity.backends.transformers.export import encoder_config_values, family_of, model_config_values

    found = [f"the .nemo's {r.text()}" for r in naming.inexpressible(nemo_config, checkpoint)]
    expected_family = family_of(nemo_config)
    if directory.family != expected_family:
        found.append(f"{CONFIG}: model_type = {directory.family!r} contradicts the .nemo's "
                     f"{'prompt-conditioned' if nemo_config.prompt else 'prompt-free'} model ({expected_family!r})")
    defaults = _config_defaults(directory.family)
    for key, value in encoder_config_values(nemo_config, dict(raw_config)).items():
        if key in _TRAINING_ONLY:
            continue
        stated = directory.encoder.get(key, defaults["encoder"].get(key))
        if not _same(stated, value):
            found.append(f"{CONFIG}: encoder_config.{key} = {stated!r} contradicts the .nemo's {value!r}")
    for key, value in model_config_values(nemo_config, vocabulary, dict(checkpoint)).items():
        if key in ("pad_token_id", "default_prompt_id"):
            continue  # padding of generate()'s sequences; a prompt-less stream's column (noted, not computed)
        stated = directory.config.get(key, defaults["model"].get(key))
        if not _same(stated, value):
            found.append(f"{CONFIG}: {key} = {stated!r} contradicts the .nemo's {value!r}")
    contexts = [list(c) for c in nemo_config.encoder.att_context_size]
    if directory.att_context_sizes() != contexts:
        found.append(f"{PROCESSOR}: supported_num_lookahead_tokens = {directory.lookaheads()} with sliding_window "
                     f"{directory.encoder.get('sliding_window')} give att_context_size {directory.att_context_sizes()}, "
                     f"the .nemo's is {contexts}")
    pre = nemo_config.preprocessor
    extractor = directory.feature_extractor
    for key, value in (("feature_size", pre.features), ("sampling_rate", pre.sample_rate), ("hop_length", pre.hop_length),
                       ("n_fft", pre.n_fft), ("win_length", pre.win_length), ("preemphasis", pre.preemph or 0.0),
                       ("padding_value", pre.pad_value)):
        stated = extractor.get(key)
        if not _same(stated, value):
            found.append(f"{PROCESSOR}: feature_extractor.{key} = {stated!r} contradicts the .nemo's "
                         f"preprocessor value {value!r}")
    if nemo_config.prompt is not None:
        stated = directory.prompt_dictionary()
        wanted = dict(nemo_config.prompt.dictionary)
        if stated != wanted:
            differing = sorted(k for k in set(stated) | set(wanted) if stated.get(k) != wanted.get(k))
            found.append(f"{PROCESSOR}: prompt_dictionary contradicts the .nemo's at "
                         + ", ".join(f"{k} ({stated.get(k)} vs {wanted.get(k)})" for k in differing[:5]))
    return found


def _same(stated: Any, value: Any) -> bool:
    if isinstance(value, float) or isinstance(stated, float):
        try:
            return abs(float(stated) - float(value)) <= 1e-9 * max(1.0, abs(float(value)))
        except (TypeError, ValueError):
            return False
    return stated == value


def _config_defaults(family: str) -> dict[str, dict[str, Any]]:
    """What transformers' config classes fill in for a field the directory leaves out (``from_pretrained``)."""
    from transformers import Nemotron3_5AsrConfig, NemotronAsrStreamingConfig, NemotronAsrStreamingEncoderConfig

    model = (Nemotron3_5AsrConfig if family == naming.FAMILY_PROMPT else NemotronAsrStreamingConfig)()
    return {"encoder": NemotronAsrStreamingEncoderConfig().to_dict(), "model": model.to_dict()}


def check_tokenizer(directory: HfDirectory, vocabulary: Sequence[str]) -> list[str]:
    """The tokenizer's pieces 0..V-1 against the .nemo's vocabulary, and the blank after them."""
    tokenizer = _read_json(directory.path / TOKENIZER)
    pieces: dict[int, str] = {int(i): p for p, i in (tokenizer.get("model", {}).get("vocab") or {}).items()}
    pieces.update({int(t["id"]): t["content"] for t in tokenizer.get("added_tokens", [])})
    found = []
    differing = [i for i, piece in enumerate(vocabulary) if pieces.get(i) != piece]
    if differing:
        i = differing[0]
        found.append(f"{TOKENIZER}: piece {i} = {pieces.get(i)!r} contradicts the .nemo's vocabulary {vocabulary[i]!r} "
                     f"({len(differing)} of {len(vocabulary)} pieces differ)")
    blank = int(directory.config.get("blank_token_id", -1))
    if blank != len(vocabulary):
        found.append(f"{CONFIG}: blank_token_id = {blank} contradicts the .nemo's blank, {len(vocabulary)} "
                     "(the vocabulary's size)")
    return found


def check_tensors(directory: HfDirectory, checkpoint: Mapping[str, Any], model_parameters: Sequence[str]) -> NemoCheck:
    """Every tensor of ``model.safetensors`` against the NeMo tensor it stands for, and the model's parameters
    the file lacks (``model_parameters``: the names of the model ``from_pretrained`` builds)."""
    from safetensors.numpy import load_file

    sources = naming.nemo_names(checkpoint)
    written = {name: np.asarray(value, np.float32) for name, value in
               _load_as_float32(directory.path / WEIGHTS, load_file).items()}
    result = NemoCheck()
    for name, value in written.items():
        source = sources.get(name)
        if source is None:
            what = ("not a parameter of the model: from_pretrained ignores it" if name not in model_parameters
                    else "no NeMo tensor stands for it")
            result.tensors.append(TensorDifference(name, None, what))
            continue
        result.compared += 1
        expected = np.asarray(checkpoint[source].detach().float().numpy(), np.float32)
        if value.shape != expected.shape or not np.array_equal(value, expected):
            result.tensors.append(TensorDifference(name, source, describe_difference(value, expected, name)))
    for name in model_parameters:
        if name not in written:
            result.tensors.append(TensorDifference(name, sources.get(name),
                                                   "missing from model.safetensors: from_pretrained leaves it at its "
                                                   "initial value (it only warns)"))
    return result


def _load_as_float32(path: Path, load_file) -> dict[str, np.ndarray]:
    """safetensors' numpy loader cannot read bfloat16; those tensors go through torch."""
    try:
        return load_file(str(path))
    except (TypeError, ValueError):
        from safetensors.torch import load_file as load_torch

        return {name: value.float().numpy() for name, value in load_torch(str(path)).items()}


def check_against_nemo(directory: HfDirectory, nemo_path: str | Path, model_parameters: Sequence[str]) -> NemoCheck:
    from streaming_parity.core.nemo_config import read_model_config
    from streaming_parity.core.nemo_file import inspect_nemo, load_state_dict

    archive = inspect_nemo(nemo_path)
    config = read_model_config(archive.config)
    checkpoint = load_state_dict(archive)
    vocabulary = nemo_vocabulary(archive, config)
    result = check_tensors(directory, checkpoint, model_parameters)
    result.contradictions = check_config(directory, config, archive.config, vocabulary, checkpoint)
    result.contradictions += check_tokenizer(directory, vocabulary)
    return result


def nemo_vocabulary(archive, config) -> list[str]:
    """The ``.nemo``'s vocabulary: ``joint.vocabulary`` where the config embeds it, else its SentencePiece model's
    pieces in id order."""
    if config.joint.vocabulary:
        return list(config.joint.vocabulary)
    import tempfile

    import sentencepiece

    with tempfile.NamedTemporaryFile(suffix=".model") as handle:
        handle.write(archive.tokenizer_model_bytes())
        handle.flush()
        processor = sentencepiece.SentencePieceProcessor(model_file=handle.name)
        return [processor.id_to_piece(i) for i in range(processor.get_piece_size())]
