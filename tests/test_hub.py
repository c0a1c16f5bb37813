"""Model sources named on the hub: the names, the resolver, and every command over a hub cache laid
out by the test (``HF_HUB_OFFLINE=1``, ``HF_HUB_CACHE`` in tmp_path: nothing reaches the network).
An artifact converted from checkpoint A fails ``parity verify --nemo B``, naming both."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from builders import run_cli
from hub_cache import seed, seed_directory

from streaming_parity.app import hub
from streaming_parity.app.cli import EXIT_OK, EXIT_USAGE, EXIT_VIOLATION, main
from streaming_parity.core.errors import InvalidInput

REPO_ROOT = Path(__file__).resolve().parents[1]
SPEECH = REPO_ROOT / "streaming_parity" / "fixtures" / "speech" / "utt02.wav"
SHORT_AUDIO = REPO_ROOT / "streaming_parity" / "fixtures" / "speech" / "utt04.wav"
REPO, OTHER = "acme/tiny-streaming", "acme/tiny-streaming-b"


@pytest.fixture()
def offline_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


# -- names --------------------------------------------------------------------------------------------

def test_hub_names_and_local_paths(tmp_path, monkeypatch):
    assert hub.parse("acme/model") == hub.HubName("acme/model")
    assert hub.parse("acme/model@v1.2") == hub.HubName("acme/model", "v1.2")
    assert hub.parse("hf://acme/model@abc/sub/model.nemo") == hub.HubName("acme/model", "abc", "sub/model.nemo")
    assert hub.parse("hf://acme/model/model.nemo") == hub.HubName("acme/model", None, "model.nemo")
    assert hub.parse("nvidia/parakeet-tdt-0.6b-v2") == hub.HubName("nvidia/parakeet-tdt-0.6b-v2")
    for local in ("model.nemo", "dir/model.nemo", "audio/a.wav", "a/b/c", "acme/model@", "/abs/path"):
        assert hub.parse(local) is None, local
    with pytest.raises(InvalidInput, match="hf://ORG/NAME"):
        hub.parse("hf://acme/model")
    # A local path that exists always wins over the hub reading.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "acme" / "model").mkdir(parents=True)
    assert hub.parse("acme/model") is None
    assert hub.resolve_source("acme/model", "mlx").hub is None


def test_only_the_files_a_command_needs_are_asked_for(offline_cache, monkeypatch, tmp_path):
    import huggingface_hub

    from streaming_parity.interface.registry import get

    calls = []
    snapshot = offline_cache / "models--acme--x" / "snapshots" / ("c" * 40)
    (snapshot / "sub").mkdir(parents=True)
    (snapshot / "model.nemo").write_bytes(b"x")
    (snapshot / "sub" / "other.nemo").write_bytes(b"y")

    def snapshot_download(repo_id, **options):
        calls.append((repo_id, options))
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    resolved = hub.resolve_source("hf://acme/x@v2/model.nemo")
    assert resolved.path == snapshot / "model.nemo"
    assert (resolved.hub.repo, resolved.hub.revision, resolved.hub.requested) == ("acme/x", "c" * 40, "v2")
    repo_id, options = calls[-1]
    assert repo_id == "acme/x" and options["revision"] == "v2" and options["allow_patterns"][0] == "model.nemo"
    assert options["cache_dir"] == offline_cache and options["local_files_only"] is True

    assert hub.resolve_source("acme/x@v2", "mlx").path == snapshot
    assert calls[-1][1]["allow_patterns"] == list(get("mlx").hub_patterns)
    assert "*.safetensors" in calls[-1][1]["allow_patterns"] and "*.nemo" not in calls[-1][1]["allow_patterns"]
    with pytest.raises(InvalidInput, match="2 .nemo files"):  # two checkpoints: the name must say which
        hub.resolve_source("acme/x")
    assert calls[-1][1]["allow_patterns"] == ["*.nemo"]


def test_an_uncached_name_offline_is_one_line_of_bad_input(offline_cache, capsys):
    code, out, err = run_cli(capsys, "transcribe", "nobody/nothing@v3", SPEECH)
    assert code == EXIT_USAGE
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: ") and "Traceback" not in err
    assert "nobody/nothing" in lines[-1] and "v3" in lines[-1] and str(offline_cache) in lines[-1]
    assert "HF_HUB_OFFLINE" in lines[-1]
    code, _, err = run_cli(capsys, "verify", "nobody/nothing-mlx")
    assert code == EXIT_USAGE and "nobody/nothing-mlx revision main is not in the hub cache" in err
    code, _, err = run_cli(capsys, "-v", "fingerprint", "nobody/nothing")  # -v: the resolver's debug lines
    assert code == EXIT_USAGE and "DEBUG" in err and "resolving nobody/nothing" in err


# -- commands over the cache -------------------------------------------------------------------------

@pytest.mark.nemo
def test_transcribe_and_compare_a_hub_checkpoint(tiny_nemo, offline_cache, tmp_path, capsys):
    commit = seed(offline_cache, REPO, {"tiny-streaming.nemo": tiny_nemo})
    code, out, _ = run_cli(capsys, "transcribe", REPO, SPEECH, "--att-context", "70,13")
    assert code == EXIT_OK and out.startswith("utt02.wav\t[70,13]\t")

    results = tmp_path / "results.json"
    code, out, err = run_cli(capsys, "compare", REPO, "--audio", SPEECH, "--att-context", "70,13", "--json", results)
    assert code == EXIT_OK, out + err
    data = json.loads(results.read_text())
    assert (data["model"]["hub_repo"], data["model"]["hub_revision"]) == (REPO, commit)
    assert data["model"]["backends"][0] == {"backend": "nemo", "path": data["model"]["path"],
                                            "sha256": data["model"]["sha256"], "hub_repo": REPO,
                                            "hub_revision": commit}
    assert data["environment"]["harness_version"]
    # stderr is not a terminal here: no live bar, one log line per phase instead.
    assert "compare: loading nemo" in err and "\r" not in err
    code, _, err = run_cli(capsys, "-q", "compare", REPO, "--audio", SPEECH, "--att-context", "70,13")
    assert code == EXIT_OK and err == ""


@pytest.fixture(scope="module")
def converted(tiny_nemo, tmp_path_factory):
    """Checkpoint A at ``REPO@v1``, converted (``parity convert REPO@v1 --model-card``) and verified."""
    pytest.importorskip("mlx.core", reason="mlx is not installed (pip install '.[mlx]')")
    root = tmp_path_factory.mktemp("hub-convert")
    cache, out = root / "hub", root / "artifact"
    commit = seed(cache, REPO, {"tiny-streaming.nemo": tiny_nemo}, branch="v1")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_CACHE", str(cache))
        patch.setenv("HF_HUB_OFFLINE", "1")
        code = main(["convert", f"{REPO}@v1", "--out", str(out), "--audio", str(SHORT_AUDIO),
                     "--att-context", "70,13", "--model-card"])
    assert code == EXIT_OK
    return {"cache": cache, "artifact": out, "commit": commit}


@pytest.mark.nemo
@pytest.mark.mlx
def test_convert_at_a_revision_records_the_hub_source(converted, tiny_nemo):
    from streaming_parity.core.nemo_file import sha256_file

    out, commit = converted["artifact"], converted["commit"]
    record = json.loads((out / "artifact.json").read_text())["provenance"]
    assert record["source_sha256"] == sha256_file(tiny_nemo) and record["source_name"] == "tiny-streaming.nemo"
    assert (record["hub_repo"], record["hub_revision"]) == (REPO, commit)
    assert record["harness_version"] and record["versions"]["mlx"] and record["versions"]["torch"]
    parity = json.loads((out / "parity.json").read_text())
    assert parity["passed"] and parity["provenance"]["hub_revision"] == commit
    card = (out / "README.md").read_text()
    assert f"base_model: {REPO}\n" in card and f"base_model_revision: {commit}\n" in card
    assert "library_name: mlx\n" in card
    assert f"parity verify {out} --nemo {REPO}@{commit} --att-context 70,13" in card
    assert "| 70,13 | plain |" in card


@pytest.mark.nemo
@pytest.mark.mlx
def test_verify_against_the_hub_checkpoint_and_refuse_another(converted, tiny_nemo, tmp_path, capsys, monkeypatch):
    from streaming_parity.core.nemo_file import sha256_file
    from streaming_parity.fixtures.models import rewrite_checkpoint

    monkeypatch.setenv("HF_HUB_CACHE", str(converted["cache"]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = converted["artifact"]
    code, stdout, _ = run_cli(capsys, "verify", out, "--nemo", REPO + "@v1", "--audio", SHORT_AUDIO,
                          "--att-context", "70,13")
    assert code == EXIT_OK, stdout

    # Checkpoint B: A with one tensor changed, on the hub as another repository.
    def one_changed(state):
        name = next(k for k, v in state.items() if v.is_floating_point())
        return {**state, name: state[name] * 1.01}

    other = rewrite_checkpoint(tiny_nemo, tmp_path / "b.nemo", one_changed)
    other_commit = seed(converted["cache"], OTHER, {"b.nemo": other})
    code, stdout, _ = run_cli(capsys, "verify", out, "--nemo", OTHER, "--audio", SHORT_AUDIO, "--att-context", "70,13")
    assert code == EXIT_VIOLATION
    lines = stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("FAIL "), stdout
    for fragment in (sha256_file(tiny_nemo), sha256_file(other), f"{REPO}@{converted['commit']}",
                     f"{OTHER}@{other_commit}"):
        assert fragment in lines[0]


@pytest.mark.nemo
@pytest.mark.mlx
def test_without_a_manifest_the_weights_tell_another_checkpoint(converted, tiny_nemo, tmp_path, capsys):
    """No artifact.json and no source in the safetensors metadata: every weight differing from the
    named checkpoint means another checkpoint."""
    import mlx.core as mx

    from streaming_parity.fixtures.models import rewrite_checkpoint

    bare = tmp_path / "bare"
    shutil.copytree(converted["artifact"], bare)
    (bare / "artifact.json").unlink()
    weights = dict(mx.load(str(bare / "model.safetensors")))
    mx.save_safetensors(str(bare / "model.safetensors"), weights)  # without the metadata
    other = rewrite_checkpoint(tiny_nemo, tmp_path / "c.nemo",
                               lambda s: {k: v * 1.5 if v.is_floating_point() else v for k, v in s.items()})
    code, stdout, _ = run_cli(capsys, "verify", bare, "--nemo", other, "--audio", SHORT_AUDIO, "--att-context", "70,13")
    assert code == EXIT_VIOLATION
    assert stdout.startswith("FAIL ") and f"every one of its {len(weights)} weight tensors differs" in stdout


@pytest.mark.nemo
@pytest.mark.mlx
def test_compare_reads_an_mlx_artifact_from_the_hub(converted, tiny_nemo, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(converted["cache"]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    mlx_commit = seed_directory(converted["cache"], "acme/tiny-streaming-mlx", converted["artifact"])
    results = tmp_path / "results.json"
    code, out, err = run_cli(capsys, "compare", f"{REPO}@v1", "--mlx", "acme/tiny-streaming-mlx", "--audio", SHORT_AUDIO,
                         "--att-context", "70,13", "--json", results)
    assert code == EXIT_OK, out + err
    backends = {b["backend"]: b for b in json.loads(results.read_text())["model"]["backends"]}
    mlx = backends["mlx:float32"]
    assert (mlx["hub_repo"], mlx["hub_revision"]) == ("acme/tiny-streaming-mlx", mlx_commit)
    assert mlx["source_sha256"] == backends["nemo"]["sha256"] and mlx["made_by"].startswith("streaming-parity")
    assert (mlx["source_hub_repo"], mlx["source_hub_revision"]) == (REPO, converted["commit"])
    # The artifact alone, from the hub: its config against its weights, and the numbers against the recording of
    # the reference that parity convert put in it (downloaded with it), with no NeMo named.
    code, out, _ = run_cli(capsys, "verify", "acme/tiny-streaming-mlx")
    assert code == EXIT_OK and "reference: " in out and "comparisons within tolerance" in out, out


@pytest.mark.nemo
@pytest.mark.onnx
def test_export_onnx_from_the_hub_records_provenance(tiny_nemo, offline_cache, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    commit = seed(offline_cache, REPO, {"tiny-streaming.nemo": tiny_nemo})
    out = tmp_path / "onnx"
    code, stdout, err = run_cli(capsys, "export-onnx", f"hf://{REPO}/tiny-streaming.nemo", "--out", out,
                            "--att-context", "70,13")
    assert code == EXIT_OK, err
    record = json.loads((out / "export.json").read_text())
    assert record["options"]["att_context_sizes"] == [[70, 13]]
    assert (record["provenance"]["hub_repo"], record["provenance"]["hub_revision"]) == (REPO, commit)
    assert record["provenance"]["source_sha256"] == record["source_sha256"]
    assert "export-onnx: encoder [70, 13]" in err  # one log line per graph where stderr is no terminal

    onnx_commit = seed_directory(offline_cache, "acme/tiny-streaming-onnx", out)
    code, stdout, _ = run_cli(capsys, "transcribe", "--backend", "onnx", "--onnx", "acme/tiny-streaming-onnx",
                          "--att-context", "70,13", SPEECH)
    assert code == EXIT_OK and stdout.startswith("utt02.wav\t[70,13]\t")
    snapshot = offline_cache / "models--acme--tiny-streaming-onnx" / "snapshots" / onnx_commit
    assert (snapshot / "export.json").exists()
