"""Provenance: the record every export, manifest and results file carries, and the report's header
that shows it for every backend."""

from __future__ import annotations

import importlib.metadata
import subprocess

from streaming_parity.core.system.provenance import (
    CHECKOUT,
    HubOrigin,
    Provenance,
    git_commit,
    library_versions,
    sha256_path,
)
from streaming_parity.judge.results import Results, environment
from streaming_parity.report import render_html, render_markdown


def test_the_record_names_source_hub_harness_commit_and_versions(tmp_path):
    source = tmp_path / "model.nemo"
    source.write_bytes(b"checkpoint")
    record = Provenance.collect(source, hub=HubOrigin("acme/model", "c" * 40, requested="v1"))
    data = record.to_dict()
    assert set(data) == {"source_name", "source_sha256", "hub_repo", "hub_revision", "harness_version", "git_commit",
                         "versions"}
    assert data["source_name"] == "model.nemo" and data["source_sha256"] == sha256_path(source)
    assert (data["hub_repo"], data["hub_revision"]) == ("acme/model", "c" * 40)
    assert data["harness_version"] == importlib.metadata.version("streaming-parity")
    assert set(data["versions"]) <= {"torch", "nemo_toolkit", "onnx", "onnxruntime", "mlx", "numpy"}
    assert data["versions"]["numpy"] == importlib.metadata.version("numpy")
    assert Provenance.from_dict(data) == record
    assert Provenance.from_dict({"source_sha256": "ab"}).versions == {} and Provenance.from_dict(None) is None
    assert record.source_label() == f"sha256 {sha256_path(source)} (acme/model@{'c' * 40})"


def test_git_commit_only_from_a_checkout(tmp_path):
    assert git_commit(tmp_path) is None  # not a checkout: no commit, and no enclosing repository's either
    if (CHECKOUT / ".git").exists():
        head = subprocess.run(["git", "-C", str(CHECKOUT), "rev-parse", "HEAD"], capture_output=True, text=True)
        assert git_commit() == head.stdout.strip()


def test_a_directory_hash_covers_names_and_contents(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.bin").write_bytes(b"1")
    first = sha256_path(tmp_path / "a")
    (tmp_path / "a" / "x.bin").rename(tmp_path / "a" / "y.bin")
    assert sha256_path(tmp_path / "a") != first


def test_results_record_the_harness_and_its_commit():
    env = environment()
    assert env["harness_version"] == importlib.metadata.version("streaming-parity")
    assert env["git_commit"] == git_commit()
    assert set(library_versions()) <= set(env["versions"])


def results_with_backends(made_by: str = "streaming-parity 0.1.0 (commit 0123456789ab)") -> Results:
    model_sha = "ab" * 32
    return Results(model={
        "name": "tiny", "path": "/x/tiny.nemo", "sha256": model_sha, "hub_repo": "acme/tiny", "hub_revision": "c" * 40,
        "backends": [
            {"backend": "nemo", "path": "/x/tiny.nemo", "sha256": model_sha, "hub_repo": "acme/tiny",
             "hub_revision": "c" * 40},
            {"backend": "mlx:float32", "path": "/x/mlx", "sha256": "de" * 32, "hub_repo": "acme/tiny-mlx",
             "hub_revision": "d" * 40, "source_sha256": model_sha, "made_by": made_by},
            {"backend": "onnx:float32", "path": "/x/onnx", "sha256": "ef" * 32, "hub_repo": None, "hub_revision": None,
             "source_sha256": "99" * 32, "made_by": None},
        ]}, tolerances="tolerances.toml")


def test_the_report_header_shows_every_backends_provenance():
    results = results_with_backends()
    markdown = render_markdown([results])
    line = next(line for line in markdown.splitlines() if line.startswith("Provenance: "))
    assert f"nemo {'ab' * 6} (acme/tiny@{'c' * 12})" in line
    assert f"mlx:float32 {'de' * 6} (acme/tiny-mlx@{'d' * 12}), made from {'ab' * 6} by streaming-parity 0.1.0" in line
    assert f"onnx:float32 {'ef' * 6}, made from {'99' * 6} — another checkpoint" in line
    assert "harness streaming-parity" in line
    html = render_html([results])
    header = html.split('id="provenance">', 1)[1].split("</p>", 1)[0]
    assert f"acme/tiny-mlx@{'d' * 12}" in header and 'class="stale"' in header


def test_the_header_escapes_what_a_results_file_says():
    html = render_html([results_with_backends(made_by="<script>alert(1)</script>")])
    assert "<script>alert(1)</script>" not in html and "&lt;script&gt;" in html


def test_nightly_candidate_records_give_the_header_too():
    results = Results(model={"name": "tiny", "sha256": "ab" * 32}, tolerances="t.toml")
    results.extra["candidates"] = [{"backend": "mlx", "dtype": "bfloat16", "status": "ok", "artifact": "/w/mlx",
                                    "artifact_sha256": "12" * 32, "source_sha256": "ab" * 32,
                                    "made_by": "streaming-parity 0.1.0"}]
    line = next(line for line in render_markdown([results]).splitlines() if line.startswith("Provenance: "))
    assert f"nemo {'ab' * 6}" in line and f"mlx:bfloat16 {'12' * 6}, made from {'ab' * 6} by streaming-parity" in line
    assert "another checkpoint" not in line
