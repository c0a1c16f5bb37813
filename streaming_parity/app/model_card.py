"""The hub model card of an MLX artifact: ``README.md``, written by ``parity convert --model-card``.

Everything in it is read from the artifact itself, so it can be written again at any time:
``artifact.json`` (dtype, the checkpoint's sha256, the hub repository and commit it came from, the
software that converted it), ``parity.json`` (the verification that allowed publication) and
``config.json`` (a license, when the NeMo config states one). The card says what the artifact is,
shows the parity table (worst max_abs per lookahead and tap group, token agreement), the WER where
the verification measured one, and the exact ``parity verify`` command that checks it again.
``parity publish`` writes it once more with the repository it uploads to, so that the command
names the published artifact.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jinja2
import yaml

from streaming_parity.app.verify import TAP_GROUPS, grouped_worst
from streaming_parity.backends.mlx.artifact import (
    ARTIFACT_FILE,
    CONFIG_FILE,
    MODEL_CARD_FILE,
    PARITY_FILE,
    recorded_provenance,
)
from streaming_parity.core.system.provenance import Provenance

MARKER = "<!-- model card written by streaming-parity (parity convert --model-card) -->"
TAGS = ("mlx", "nemo", "speech", "automatic-speech-recognition", "streaming", "cache-aware-streaming",
        "fastconformer", "rnnt", "streaming-parity")
HEADERS = {"mel": "mel", "pre_encode": "pre_enc", "layers": "layers", "encoder": "encoder", "caches": "caches",
           "decoder": "decoder", "joint": "joint"}

TEMPLATE = """---
{{ front_matter }}---
{{ marker }}

# {{ title }}

{{ source_text }} converted to [MLX](https://github.com/ml-explore/mlx) ({{ dtype }}):
a cache-aware streaming FastConformer-RNNT speech recognizer for Apple silicon (and MLX on Linux),
with the weights in `model.safetensors`, the checkpoint's own mel front end in `frontend.safetensors`,
its NeMo config in `config.json` and its tokenizer in `tokenizer.model`.
{% if prompt_text %}

{{ prompt_text }}
{% endif %}
{% if parity %}

Converted and checked by streaming-parity against NeMo itself: the same audio, chunked the same
way, through both; every layer, cache and token compared at every streaming step.
{{ "Every comparison was within tolerance." if parity.passed else "**The check failed.**" }}

## Parity against NeMo

Worst max_abs over {{ parity.utterances | length }} utterance(s), per lookahead and first-chunk mode
(`–`: not compared); tokens: the comparisons whose tokens are identical.

{% for line in parity_table %}
{{ line }}
{% endfor %}

Token agreement (1 − edit distance / reference tokens, over every comparison):
**{{ "%.4f" | format(parity.token_agreement) }}**.

{{ parity.summary }}.
{% if wer_table %}

## Word error rate

On the verification audio (plain first-chunk mode), against its reference text:

{% for line in wer_table %}
{{ line }}
{% endfor %}
{% endif %}
{% else %}

**Not verified**: this artifact was converted with `--skip-verify`. Run the command below before
trusting it.
{% endif %}

## Verify it

```bash
pip install 'streaming-parity[nemo,mlx]'
{{ verify_command }}
```

Exit 0: every tap within tolerance and identical tokens; 1: a parity violation, or an artifact
converted from another checkpoint than the one named (the recorded sha256 differs).

## Provenance

{% for line in provenance_table %}
{{ line }}
{% endfor %}
"""


def table(header: list[str], rows: list[list[str]], align: list[str] | None = None) -> list[str]:
    """A Markdown table as lines (``align``: ``---`` or ``---:`` per column)."""
    align = align or ["---"] * len(header)
    return ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"] + [
        "| " + " | ".join(row) + " |" for row in rows]


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.1e}"


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def front_matter(provenance: Provenance | None, config: dict[str, Any]) -> dict[str, Any]:
    data: dict[str, Any] = {"library_name": "mlx", "pipeline_tag": "automatic-speech-recognition"}
    if provenance is not None and provenance.hub_repo:
        data["base_model"] = provenance.hub_repo
        if provenance.hub_revision:
            data["base_model_revision"] = provenance.hub_revision
    if isinstance(config.get("license"), str) and config["license"].strip():
        data["license"] = config["license"].strip()
    data["tags"] = list(TAGS)
    return data


def prompt_text(config: dict[str, Any]) -> str | None:
    """A prompt-conditioned model's language-ID prompt (``model_defaults``: num_prompts, prompt_dictionary),
    in a sentence; None for any other model, or a config that cannot be read."""
    from streaming_parity.core.nemo_config import read_model_config

    try:
        prompt = read_model_config(config).prompt
    except Exception:  # noqa: BLE001 - the card is written whatever the config; it then says nothing more
        return None
    if prompt is None:
        return None
    locales = ", ".join(f"`{locale}` ({index})" for locale, index in sorted(prompt.dictionary, key=lambda p: p[1]))
    return (f"Prompt-conditioned (NeMo's `EncDecRNNTBPEModelWithPrompt`): each stream is given a locale, a one-hot "
            f"column of {prompt.num_prompts} fused into the encoder output by `prompt_kernel`; the locales of "
            f"`model_defaults.prompt_dictionary` (column in brackets): {locales or 'none'}.")


def verify_command(artifact_ref: str, provenance: Provenance | None, parity: dict[str, Any] | None) -> str:
    """The ``parity verify`` command that repeats the check: the artifact, the checkpoint it came from
    (at the recorded hub commit when it came from the hub), the lookaheads the check ran."""
    if provenance is not None and provenance.hub_repo:
        source = provenance.hub_repo + (f"@{provenance.hub_revision}" if provenance.hub_revision else "")
    else:
        source = (provenance.source_name if provenance and provenance.source_name else None) or "MODEL.nemo"
    contexts = "".join(f" --att-context {c[0]},{c[1]}" for c in (parity or {}).get("att_context_sizes", []))
    return f"parity verify {artifact_ref} --nemo {source}{contexts}"


def parity_table(parity: dict[str, Any]) -> list[str]:
    """One row per lookahead and first-chunk mode; a column per tap group (``TAP_GROUPS``, then any
    other tap the verification compared, e.g. a hybrid model's ``ctc``)."""
    tokens = parity.get("tokens") or {}
    grouped = {(context, mode): grouped_worst(worst)
               for context, by_mode in (parity.get("worst_max_abs") or {}).items() for mode, worst in by_mode.items()}
    groups = [*TAP_GROUPS, *sorted({g for values in grouped.values() for g in values} - set(TAP_GROUPS))]
    rows = []
    for (context, mode), values in grouped.items():
        summary = (tokens.get(context) or {}).get(mode) or {}
        rows.append([context, mode, *(_fmt(values.get(g)) for g in groups),
                     f"{summary.get('identical', '?')}/{summary.get('total', '?')}"])
    header = ["lookahead", "mode", *(HEADERS.get(g, g) for g in groups), "tokens"]
    return table(header, rows, ["---", "---"] + ["---:"] * (len(header) - 2))


def wer_table(parity: dict[str, Any] | None) -> list[str]:
    wer = (parity or {}).get("wer") or {}
    backends = sorted({b for by_backend in wer.values() for b in by_backend}, key=lambda b: (b != "nemo", b))
    if not backends:
        return []
    rows = [[context, *(f"{100 * by_backend[b]:.1f} %" if b in by_backend else "–" for b in backends)]
            for context, by_backend in wer.items()]
    return table(["lookahead", *backends], rows, ["---"] + ["---:"] * len(backends))


def render(directory: str | Path, *, artifact_ref: str | None = None) -> str:
    """The model card of the artifact in ``directory``; ``artifact_ref``: how the verify command names
    the artifact (default: the directory as given)."""
    directory = Path(directory)
    record = _read_json(directory / ARTIFACT_FILE) or {}
    provenance = recorded_provenance(directory)
    parity = _read_json(directory / PARITY_FILE)
    config = _read_json(directory / CONFIG_FILE) or {}
    dtype = record.get("dtype", "?")
    if provenance is not None and provenance.hub_repo:
        base = provenance.hub_repo.split("/")[-1]
        source_text = f"[{provenance.hub_repo}](https://huggingface.co/{provenance.hub_repo})" + (
            f" at revision `{provenance.hub_revision}`" if provenance.hub_revision else "")
    else:
        base = Path((provenance.source_name if provenance else None) or directory.name).stem
        source_text = f"The NeMo checkpoint `{(provenance.source_name if provenance else None) or '?'}`"
    rows = [("source sha256", f"`{provenance.source_sha256}`" if provenance and provenance.source_sha256 else "?")]
    if provenance is not None and provenance.hub_repo:
        rows.append(("source", f"{provenance.hub_repo}@{provenance.hub_revision or '?'}"))
    if provenance is not None:
        rows.append(("converted by", provenance.made_by()))
        rows += [(package, version) for package, version in provenance.versions.items()]
    if parity is not None:
        rows.append(("verified", parity.get("created", "?")))
        tolerances = parity.get("tolerances") or {}
        if tolerances.get("sha256"):
            rows.append(("tolerances sha256", f"`{tolerances['sha256']}`"))
    environment = jinja2.Environment(autoescape=False, trim_blocks=True, lstrip_blocks=True,
                                     keep_trailing_newline=True, undefined=jinja2.StrictUndefined)
    return environment.from_string(TEMPLATE).render(
        front_matter=yaml.safe_dump(front_matter(provenance, config), sort_keys=False, allow_unicode=True),
        marker=MARKER, title=f"{base} (MLX, {dtype})", source_text=source_text, dtype=dtype, parity=parity,
        prompt_text=prompt_text(config),
        parity_table=parity_table(parity) if parity else [], wer_table=wer_table(parity),
        verify_command=verify_command(artifact_ref or str(directory), provenance, parity),
        provenance_table=table(["", ""], [[label, str(value)] for label, value in rows]))


def write(directory: str | Path, *, artifact_ref: str | None = None) -> Path:
    path = Path(directory) / MODEL_CARD_FILE
    path.write_text(render(directory, artifact_ref=artifact_ref), encoding="utf-8")
    return path


def is_generated(path: Path) -> bool:
    """Whether ``README.md`` is a card this module wrote (and may write again)."""
    try:
        return MARKER in path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
