"""The suites' configuration lives in the ``streaming_parity.app.pytest_plugin`` plugin (markers, options,
hypothesis profiles, fixtures), installed as the ``pytest11`` entry point ``parity``. A checkout that
is not installed loads it from here instead."""

from __future__ import annotations

from importlib.metadata import entry_points

if not any(ep.value == "streaming_parity.app.pytest_plugin" for ep in entry_points(group="pytest11")):
    pytest_plugins = ["streaming_parity.app.pytest_plugin"]
