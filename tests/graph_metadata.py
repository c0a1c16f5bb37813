"""Rewriting an ONNX graph's metadata in place, its weights left where they are (external data untouched):
how the tests make a graph that lies about itself, or one written by an older exporter."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path


def set_metadata(graph: Path, drop: tuple[str, ...] = (), **values) -> None:
    """Set some of the graph's metadata props to ``str(value)``; ``drop``: keys removed."""
    edit_metadata(graph, lambda props: _update(props, drop, {key: str(value) for key, value in values.items()}))


def edit_metadata(graph: Path, edit: Callable[[dict[str, str]], None]) -> None:
    """``edit`` changes the graph's metadata props (a dict of strings) in place."""
    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    props = {p.key: p.value for p in model.metadata_props}
    edit(props)
    del model.metadata_props[:]
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(graph))


def _update(props: dict[str, str], drop: tuple[str, ...], values: dict[str, str]) -> None:
    for key in drop:
        props.pop(key, None)
    props.update(values)
