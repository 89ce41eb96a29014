"""FeatureCache / TextFeatureCache on disk: verified entries, bad files named and recomputed, unwritable
directories tolerated, concurrent writers (threads and processes) never tear or mix an entry."""

from __future__ import annotations

import logging
import multiprocessing
import threading
import time

import pytest
import torch

import vlmad.backbones.cache
from vlmad.backbones.cache import FeatureCache, load_entry
from vlmad.methods.aprilgan import AprilGAN
from vlmad.methods.prompts import PromptSet, TextFeatureCache, ensemble_text_features

LAYERS = (1, 3)


@pytest.fixture
def method(tiny_backbone):
    return AprilGAN(tiny_backbone, feature_layers=LAYERS)


@pytest.fixture
def images():
    return torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def _assert_equal(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], msg=name)  # batch size changes the last float bits


def _entries(directory) -> list:
    return sorted(directory.rglob("*.pt"))


def _cache_warnings(caplog) -> list[str]:
    name = "vlmad.backbones.cache"
    return [r.getMessage() for r in caplog.records if r.name == name and r.levelno == logging.WARNING]


def _vlmad_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("vlmad") and r.levelno == logging.WARNING]


def test_disk_entries_hold_their_key_and_hit(method, images, tmp_path, caplog):
    cache = FeatureCache("disk", tmp_path)
    fresh = method.encode_images(images)
    _assert_equal(cache.fetch(method, images), fresh)
    _assert_equal(cache.fetch(method, images), fresh)
    assert (cache.misses, cache.hits) == (4, 4)
    files = _entries(tmp_path)
    assert len(files) == 4 and not list(tmp_path.rglob("*.tmp"))
    for path in files:  # the key is the file's path below the cache root, and is stored inside
        key = str(path.relative_to(tmp_path).with_suffix(""))
        assert set(load_entry(path, key)) == set(fresh)
    assert not _cache_warnings(caplog)


def _truncate(path, other) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garbage(path, other) -> None:
    path.write_bytes(b"\x00" * 100)


def _empty(path, other) -> None:
    path.write_bytes(b"")


def _other_entry(path, other) -> None:  # a valid entry of another image copied over this one
    path.write_bytes(other.read_bytes())


def _old_format(path, other) -> None:  # a plain feature dict, as written before entries held their key
    torch.save(load_entry(other, str(other.relative_to(other.parents[1]).with_suffix(""))), path)


@pytest.mark.parametrize("damage", [_truncate, _garbage, _empty, _other_entry, _old_format], ids=lambda f: f.__name__)
def test_bad_entry_is_named_recomputed_and_rewritten(method, images, tmp_path, caplog, damage):
    cache = FeatureCache("disk", tmp_path)
    fresh = method.encode_images(images)
    cache.fetch(method, images)
    bad, other = _entries(tmp_path)[:2]
    damage(bad, other)
    caplog.set_level(logging.WARNING)
    _assert_equal(cache.fetch(method, images), fresh)  # the bad one recomputed, never another image's features
    messages = _cache_warnings(caplog)
    assert len(messages) == 1 and str(bad) in messages[0] and "recomputing" in messages[0], messages
    caplog.clear()
    _assert_equal(FeatureCache("disk", tmp_path).fetch(method, images), fresh)  # rewritten: clean hits now
    assert not _cache_warnings(caplog)


def _not_a_directory(tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("x")
    return tmp_path / "a_file" / "cache"  # mkdir raises NotADirectoryError (chmod cannot stop root)


def _permission_denied(tmp_path, monkeypatch):
    def refuse(obj, path, *args, **kwargs):  # what a read-only directory does to a non-root writer
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(vlmad.backbones.cache.torch, "save", refuse)
    return tmp_path / "cache"


@pytest.mark.parametrize("unwritable", [_not_a_directory, _permission_denied], ids=lambda f: f.__name__)
def test_unwritable_directory_warns_once_and_runs_uncached(method, images, tmp_path, monkeypatch, caplog, unwritable):
    directory = unwritable(tmp_path, monkeypatch)
    cache = FeatureCache("disk", directory)
    fresh = method.encode_images(images)
    caplog.set_level(logging.WARNING)
    for _ in range(2):
        _assert_equal(cache.fetch(method, images), fresh)
    messages = _cache_warnings(caplog)
    assert len(messages) == 1 and "not writable" in messages[0] and str(directory) in messages[0], messages
    assert cache.misses == 8 and cache.bytes == 0
    assert not list(tmp_path.rglob("*.tmp"))  # no temporary file left behind


def test_text_cache_verifies_entries_and_tolerates_an_unwritable_directory(tiny_backbone, tmp_path, caplog):
    prompts = PromptSet(("{}",), ("damaged {}",), ("a photo of a {}.",))  # small: the cache is under test
    want = ensemble_text_features(tiny_backbone, prompts, "bottle", True, True)
    TextFeatureCache(tmp_path).get(tiny_backbone, prompts, "bottle", True, True)
    TextFeatureCache(tmp_path).get(tiny_backbone, prompts, "cable", True, True)
    # the stored key is the readable settings tuple, class name included
    bottle, cable = sorted(tmp_path.glob("*.pt"), key=lambda p: "'cable'" in torch.load(p, weights_only=True)["key"])
    caplog.set_level(logging.WARNING)
    caplog.clear()
    cache = TextFeatureCache(tmp_path)
    torch.testing.assert_close(cache.get(tiny_backbone, prompts, "bottle", True, True), want)
    assert cache.encoded == 0 and not _vlmad_warnings(caplog)
    for damage in (_other_entry, _truncate):
        damage(bottle, cable)
        caplog.clear()
        cache = TextFeatureCache(tmp_path)
        torch.testing.assert_close(cache.get(tiny_backbone, prompts, "bottle", True, True), want)
        messages = _vlmad_warnings(caplog)
        assert cache.encoded == 1 and len(messages) == 1 and str(bottle) in messages[0], messages
    (tmp_path / "a_file").write_text("x")
    caplog.clear()
    cache = TextFeatureCache(tmp_path / "a_file" / "text")
    for name in ("bottle", "bottle", "cable"):
        cache.get(tiny_backbone, prompts, name, True, True)
    torch.testing.assert_close(cache.get(tiny_backbone, prompts, "bottle", True, True), want)
    assert [m.count("not writable") for m in _vlmad_warnings(caplog)] == [1]


def test_concurrent_threads_use_distinct_temporary_files(method, images, tmp_path, monkeypatch):
    written: list[str] = []
    save = torch.save

    def slow_save(obj, path, *args, **kwargs):  # hold each writer inside its write so the two overlap
        written.append(str(path))
        save(obj, path, *args, **kwargs)
        time.sleep(0.05)

    monkeypatch.setattr(vlmad.backbones.cache.torch, "save", slow_save)
    errors: list[BaseException] = []

    def job():
        try:
            FeatureCache("disk", tmp_path).fetch(method, images[:1])
        except BaseException as err:  # surfaced in the main thread below
            errors.append(err)

    threads = [threading.Thread(target=job) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert len(written) == 2 and written[0] != written[1] and not any(p.endswith(".pt") for p in written)
    _assert_equal(FeatureCache("disk", tmp_path).fetch(method, images[:1]), method.encode_images(images[:1]))


def _writer(method: AprilGAN, images: torch.Tensor, cache_dir: str, start_together, report) -> None:
    """One job: fetch every image through a cold disk cache (writing), then again (reading the other's entries)."""
    warnings: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = warnings.append  # a torn or mixed entry would be reported here
    logging.getLogger("vlmad.backbones.cache").addHandler(handler)
    cache = FeatureCache("disk", cache_dir)
    start_together.wait(timeout=60)
    for _ in range(2):
        for start in range(0, len(images), 2):
            cache.fetch(method, images[start : start + 2])
    report.put((cache.misses, [r.getMessage() for r in warnings]))


def test_two_processes_fill_one_cold_cache_without_torn_or_mixed_entries(method, tmp_path, caplog):
    images = torch.randn(16, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    # fork: the children share the imported tiny model (spawn would re-import torch and open_clip, ~10 s each)
    context = multiprocessing.get_context("fork")
    start_together, report = context.Barrier(2), context.Queue()
    workers = [
        context.Process(target=_writer, args=(method, images, str(tmp_path), start_together, report)) for _ in range(2)
    ]
    for worker in workers:
        worker.start()
    results = [report.get(timeout=120) for _ in workers]
    for worker in workers:
        worker.join(timeout=30)
        assert worker.exitcode == 0
    assert all(not messages for _, messages in results), results  # no writer ever read a partial file
    assert sum(misses for misses, _ in results) >= 16  # every image was written by at least one of them
    assert len(_entries(tmp_path)) == 16 and not list(tmp_path.rglob("*.tmp"))
    cache = FeatureCache("disk", tmp_path)
    caplog.set_level(logging.WARNING)
    _assert_equal(cache.fetch(method, images), method.encode_images(images))
    assert cache.hits == 16 and cache.misses == 0 and not _cache_warnings(caplog)


def test_mixed_precision_features_never_serve_an_fp32_run(tiny_backbone):
    """Autocast changes the encoder's output: a bf16 entry is a miss for fp32 and vice versa."""
    from vlmad.backbones.cache import FeatureCache
    from vlmad.methods.aprilgan import AprilGAN

    method = AprilGAN(tiny_backbone, feature_layers=[1, 3])
    cache = FeatureCache("memory")
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    fp32 = cache.fetch(method, images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = cache.fetch(method, images)
    assert cache.misses == 4 and cache.hits == 0
    assert not torch.equal(fp32["stages"].float(), bf16["stages"].float())
    torch.testing.assert_close(cache.fetch(method, images)["stages"], fp32["stages"])
    assert cache.hits == 2
