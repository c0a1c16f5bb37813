"""The publishable MLX artifact: its model card, and ``parity publish`` up to the upload call (the
hub's ``upload_folder`` is replaced by a recorder: nothing reaches the network). A synthetic
artifact directory stands in for a converted one: neither MLX nor NeMo is needed."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml

from streaming_parity.app import model_card
from streaming_parity.app.cli import EXIT_OK, EXIT_USAGE, EXIT_VIOLATION, main

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_artifact(directory: Path, *, passed: bool | None = True, hub: bool = True, license: str | None = "cc-by-4.0",
                  card: bool = True) -> Path:
    directory.mkdir(parents=True)
    (directory / "model.safetensors").write_bytes(b"weights")
    (directory / "frontend.safetensors").write_bytes(b"frontend")
    (directory / "tokenizer.model").write_bytes(b"tokenizer")
    (directory / "config.json").write_text(json.dumps({"license": license} if license else {}))
    (directory / ".hidden").write_text("never uploaded")
    provenance = {"source_name": "model.nemo", "source_sha256": "ab" * 32,
                  "hub_repo": "acme/streaming" if hub else None, "hub_revision": COMMIT if hub else None,
                  "harness_version": "0.1.0", "git_commit": "f" * 40, "versions": {"mlx": "0.32.4"}}
    (directory / "artifact.json").write_text(json.dumps({"dtype": "bfloat16", "source": {"sha256": "ab" * 32},
                                                          "provenance": provenance}))
    if passed is not None:
        (directory / "parity.json").write_text(json.dumps({
            "passed": passed, "summary": "2/2 comparisons within tolerance" if passed else "1/2 comparisons failed",
            "created": "2025-01-01T00:00:00+00:00", "utterances": ["utt01.wav", "utt02.wav"],
            "att_context_sizes": [[70, 13], [70, 1]],
            "artifact": {"weights_sha256": {"model.safetensors": sha256(directory / "model.safetensors")}},
            "worst_max_abs": {"70,13": {"plain": {"mel": 1e-4, "layers.0": 1e-6, "layers.1": 3e-6, "encoder": 2e-6,
                                                  "cache_last_channel": 4e-6, "cache_last_time": 1e-6}},
                              "70,1": {"plain": {"layers.0": 2e-6}}},
            "tokens": {"70,13": {"plain": {"identical": 2, "total": 2}}, "70,1": {"plain": {"identical": 1, "total": 2}}},
            "token_agreement": 0.98765, "wer": {"70,13": {"nemo": 0.05, "mlx": 0.0625}},
            "tolerances": {"sha256": "cd" * 32},
        }))
    if card:
        model_card.write(directory, artifact_ref=str(directory))
    return directory


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_model_card_front_matter_parity_table_wer_and_verify_command(tmp_path):
    text = model_card.render(make_artifact(tmp_path / "a", card=False), artifact_ref="acme/streaming-mlx")
    front, body = text.split("---\n", 2)[1:]
    meta = yaml.safe_load(front)
    assert meta["library_name"] == "mlx" and meta["base_model"] == "acme/streaming"
    assert meta["base_model_revision"] == COMMIT and meta["license"] == "cc-by-4.0" and "mlx" in meta["tags"]
    assert "| 70,13 | plain | 1.0e-04 | – | 3.0e-06 | 2.0e-06 | 4.0e-06 | – | – | 2/2 |" in body
    assert "| 70,1 | plain | – | – | 2.0e-06 | – | – | – | – | 1/2 |" in body
    assert "**0.9877**" in body
    assert "| 70,13 | 5.0 % | 6.2 % |" in body and "| lookahead | nemo | mlx |" in body
    assert f"parity verify acme/streaming-mlx --nemo acme/streaming@{COMMIT} --att-context 70,13 --att-context 70,1" \
        in body
    assert model_card.MARKER in body


def test_model_card_of_a_local_unverified_checkpoint(tmp_path):
    text = model_card.render(make_artifact(tmp_path / "a", passed=None, hub=False, license=None, card=False))
    meta = yaml.safe_load(text.split("---\n", 2)[1])
    assert "base_model" not in meta and "license" not in meta
    assert "**Not verified**" in text and f"parity verify {tmp_path / 'a'} --nemo model.nemo\n" in text


def test_dry_run_lists_exactly_what_would_be_uploaded(tmp_path, capsys, monkeypatch):
    import huggingface_hub

    artifact = make_artifact(tmp_path / "a")
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda *a, **k: pytest.fail("dry run uploaded"))
    code, out, _ = run(capsys, "publish", artifact, "acme/streaming-mlx", "--dry-run")
    assert code == EXIT_OK
    listed = {line.split()[2]: (int(line.split()[0]), line.split()[1]) for line in out.splitlines()[:-1]}
    expected = {"artifact.json", "config.json", "frontend.safetensors", "model.safetensors", "parity.json",
                "README.md", "tokenizer.model"}
    assert set(listed) == expected  # hidden files stay home
    for name in expected - {"README.md"}:
        assert listed[name] == ((artifact / name).stat().st_size, sha256(artifact / name))
    card = model_card.render(artifact, artifact_ref="acme/streaming-mlx").encode()
    assert listed["README.md"] == (len(card), hashlib.sha256(card).hexdigest())  # written for the repository
    assert out.splitlines()[-1].startswith("dry run: 7 files")


def test_publish_uploads_the_listed_files_with_the_card_naming_the_repository(tmp_path, capsys, monkeypatch):
    import huggingface_hub

    calls = []
    for method in ("create_repo", "create_branch", "upload_folder"):
        monkeypatch.setattr(huggingface_hub.HfApi, method,
                            lambda self, *args, _method=method, **kwargs: calls.append((_method, args, kwargs)))
    artifact = make_artifact(tmp_path / "a")
    code, out, _ = run(capsys, "publish", artifact, "acme/streaming-mlx", "--revision", "v1", "--private")
    assert code == EXIT_OK, out
    assert [c[0] for c in calls] == ["create_repo", "create_branch", "upload_folder"]
    assert calls[0][1] == ("acme/streaming-mlx",) and calls[0][2]["private"] is True
    assert calls[1][2]["branch"] == "v1"
    upload = calls[2][2]
    assert upload["folder_path"] == str(artifact) and upload["repo_id"] == "acme/streaming-mlx"
    assert upload["revision"] == "v1" and ".hidden" not in upload["allow_patterns"]
    assert sorted(upload["allow_patterns"]) == sorted(line.split()[2] for line in out.splitlines()[:-1])
    assert "parity verify acme/streaming-mlx@v1 --nemo acme/streaming@" in (artifact / "README.md").read_text()


def test_publish_refuses_an_unverified_failed_or_changed_artifact(tmp_path, capsys, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda *a, **k: pytest.fail("refused, yet uploaded"))
    unverified = make_artifact(tmp_path / "unverified", passed=None)
    code, _, err = run(capsys, "publish", unverified, "acme/x", "--dry-run")
    assert code == EXIT_VIOLATION and "has no parity.json" in err and len(err.strip().splitlines()) == 1
    failed = make_artifact(tmp_path / "failed", passed=False)
    code, _, err = run(capsys, "publish", failed, "acme/x")
    assert code == EXIT_VIOLATION and "records a failed verification: 1/2 comparisons failed" in err
    changed = make_artifact(tmp_path / "changed")
    (changed / "model.safetensors").write_bytes(b"other weights")
    code, _, err = run(capsys, "publish", changed, "acme/x")
    assert code == EXIT_VIOLATION and "changed after the verification" in err
    code, _, err = run(capsys, "publish", tmp_path / "missing", "acme/x")
    assert code == EXIT_USAGE and "not an MLX artifact directory" in err
