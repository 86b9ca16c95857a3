"""Weight resolution: configured path, cache, one download attempt, prompt offline errors."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from wavflow.errors import WeightsError
from wavflow.features import weights
from wavflow.features.weights import resolve_cache_dir, resolve_hub_files, resolve_weight

URL = "https://example.invalid/releases/w.pth"


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every name lookup fails, as on an offline machine (urllib and httpx both resolve names)."""

    def refuse(*_a, **_k):
        raise socket.gaierror(socket.EAI_NONAME, "network disabled by test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def test_configured_path_wins(tmp_path: Path) -> None:
    given = tmp_path / "mine.pth"
    given.write_bytes(b"abc")
    cache = tmp_path / "cache"
    (cache).mkdir()
    (cache / "w.pth").write_bytes(b"cached")
    got = resolve_weight("Sync", configured_path=given, cache_dir=cache, filename="w.pth", url=URL)
    assert got == given


def test_configured_path_missing_is_an_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pth"
    with pytest.raises(WeightsError, match="nope.pth") as err:
        resolve_weight("Sync", configured_path=missing, cache_dir=tmp_path, filename="w.pth", url=URL)
    assert "Sync" in str(err.value)


def test_cache_hit_does_not_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "w.pth").write_bytes(b"cached")
    monkeypatch.setattr(weights, "download_file", lambda *a, **k: pytest.fail("download attempted"))
    got = resolve_weight("Sync", configured_path=None, cache_dir=tmp_path, filename="w.pth", url=URL)
    assert got == tmp_path / "w.pth" and got.read_bytes() == b"cached"


def test_cache_dir_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WAVFLOW_CACHE_DIR", str(tmp_path / "env"))
    assert resolve_cache_dir(None) == tmp_path / "env"
    assert resolve_cache_dir(tmp_path / "cfg") == tmp_path / "cfg"  # the config key is explicit
    monkeypatch.delenv("WAVFLOW_CACHE_DIR")
    assert resolve_cache_dir(None) == Path("~/.cache/wavflow").expanduser()


def test_offline_missing_weight_names_url_and_target(tmp_path: Path) -> None:
    with pytest.raises(WeightsError) as err:
        resolve_weight("Synchformer", configured_path=None, cache_dir=tmp_path, filename="w.pth", url=URL,
                       allow_download=False)
    msg = str(err.value)
    assert "Synchformer" in msg and URL in msg and str(tmp_path / "w.pth") in msg
    assert "allow_download" in msg
    assert not list(tmp_path.iterdir())


def test_part_file_is_not_a_cache_hit(tmp_path: Path) -> None:
    (tmp_path / "w.pth.part").write_bytes(b"half a file")
    with pytest.raises(WeightsError, match="w.pth"):
        resolve_weight("Sync", configured_path=None, cache_dir=tmp_path, filename="w.pth", url=URL,
                       allow_download=False)


def test_download_from_file_url(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    payload = bytes(range(256)) * 9000  # > 2 MiB: several progress updates
    src = tmp_path / "release.pth"
    src.write_bytes(payload)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "w.pth.part").write_bytes(b"stale leftover")
    got = resolve_weight("Sync", configured_path=None, cache_dir=cache, filename="w.pth", url=src.as_uri())
    assert got == cache / "w.pth" and got.read_bytes() == payload
    assert sorted(p.name for p in cache.iterdir()) == ["w.pth"]  # .part renamed away
    err = capsys.readouterr().err
    assert "Sync weights" in err and "100%" in err  # tqdm bar with the known total


def test_failed_download_leaves_no_part_and_names_target(tmp_path: Path) -> None:
    bad = (tmp_path / "missing-release.pth").as_uri()
    cache = tmp_path / "cache"
    with pytest.raises(WeightsError) as err:
        resolve_weight("Sync", configured_path=None, cache_dir=cache, filename="w.pth", url=bad)
    msg = str(err.value)
    assert bad in msg and str(cache / "w.pth") in msg
    assert not (cache / "w.pth").exists() and not (cache / "w.pth.part").exists()


def test_download_without_network_fails_promptly(tmp_path: Path, no_network: None) -> None:
    start = time.monotonic()
    with pytest.raises(WeightsError, match="example.invalid"):
        resolve_weight("Sync", configured_path=None, cache_dir=tmp_path, filename="w.pth", url=URL)
    assert time.monotonic() - start < 20


@pytest.mark.parametrize("allow_download", [False, True])
def test_default_clip_hub_offline_fails_promptly(tmp_path: Path, no_network: None, allow_download: bool) -> None:
    hub_id = "apple/DFN5B-CLIP-ViT-H-14-384"
    start = time.monotonic()
    with pytest.raises(WeightsError) as err:
        resolve_hub_files(hub_id, allow_download=allow_download, hf_cache_dir=tmp_path / "hf")
    assert time.monotonic() - start < 30
    msg = str(err.value)
    assert hub_id in msg and "encoders.clip_pretrained" in msg
    assert ("allow_download=false" in msg) == (not allow_download)


def test_clip_encoder_from_hub_offline_is_weights_error(tmp_path: Path, no_network: None) -> None:
    from wavflow.features.clip import ClipEncoder

    start = time.monotonic()
    with pytest.raises(WeightsError, match="DFN5B"):
        ClipEncoder.from_hub("hf-hub:apple/DFN5B-CLIP-ViT-H-14-384", "ViT-H-14-378-quickgelu",
                             allow_download=True, hf_cache_dir=tmp_path / "hf")
    assert time.monotonic() - start < 30
