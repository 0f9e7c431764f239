import io
import json
import logging
import os
import pickle

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from gligen.data.decode import DamagedSampleError, SkipCounter
from gligen.data.examples import annotation, make_sample, png_bytes
from gligen.data.schema import SchemaError
from gligen.data.shards import encode_sample, iter_samples, resolve_shards, write_shards


def _keys(samples):
    return [s.key for s in samples]


# ------------------------------------------------------------------------------------------------ round trip
def _rich_samples():
    kps = [[0.125 * (k % 8), 0.5, k % 3] for k in range(17)]
    yield make_sample("g0", caption="a dog and a sky, naïve café ✓", boxes=[(0.1, 0.2, 0.6, 0.9), (0, 0, 1, 1)],
                      phrases=["a dog", "the sky"], persons=[kps], embed_dim=6, seed=1)
    yield make_sample("d1", kind="detection", caption="", boxes=[(0.3, 0.3, 0.31, 0.4)], phrases=["person"], seed=2)
    yield make_sample("l2", kind="detection_caption", latents=True, width=16, height=16, embed_dim=3)
    for i in range(3, 23):
        yield make_sample(f"x{i}", seed=i, boxes=[(0.01 * i, 0.02, 0.5, 0.5 + 0.01 * i)], phrases=[f"thing {i}"])


def test_round_trip_restores_everything_exactly(tmp_path):
    originals = list(_rich_samples())
    write_shards(originals, tmp_path, max_samples=10, progress=False)
    skips = SkipCounter(strict=True)
    restored = list(iter_samples(resolve_shards(str(tmp_path)), skips))
    assert _keys(restored) == [s["__key__"] for s in originals]
    assert skips.accepted == len(originals) and skips.summary() == {}
    for orig, got in zip(originals, restored):
        ann = orig["json"]
        assert got.caption == orig["txt"]
        assert got.annotation.to_json() == ann  # boxes, phrases, categories, keypoints: exact
        if "png" in orig:
            expected = np.asarray(Image.open(io.BytesIO(orig["png"])).convert("RGB"))
            assert np.array_equal(np.asarray(got.image), expected)
        else:
            assert got.image is None
        for member, value in orig.items():
            if member.endswith(".npy"):
                assert got.arrays[member].dtype == value.dtype and np.array_equal(got.arrays[member], value)
    persons = restored[0].annotation.persons
    assert np.array_equal(persons[0].keypoints, np.asarray(originals[0]["json"]["persons"][0]["keypoints"],
                                                           np.float32))


def test_index_and_even_shards(tmp_path):
    index = write_shards(_rich_samples(), tmp_path / "out", prefix="coco", max_samples=10, progress=False)
    names = sorted(os.listdir(tmp_path / "out"))
    assert names == ["coco-000000.tar", "coco-000001.tar", "coco-000002.tar", "index.json"]
    assert [s["samples"] for s in index["shards"]] == [10, 10, 3]
    assert index["kinds"] == {"detection": 1, "detection_caption": 1, "grounding": 21}
    assert index["total"] == 23 and index["schema_version"] == 1
    assert json.loads((tmp_path / "out" / "index.json").read_text()) == index
    assert resolve_shards(str(tmp_path / "out" / "index.json")) == [str(tmp_path / "out" / n) for n in names[:3]]
    pattern = str(tmp_path / "out" / "coco-{000000..000002}.tar")
    assert resolve_shards(pattern) == resolve_shards(str(tmp_path / "out"))


def test_max_bytes_splits_shards(tmp_path):
    index = write_shards(_rich_samples(), tmp_path, max_samples=100, max_bytes=5_000, progress=False)
    assert len(index["shards"]) > 1 and index["total"] == 23


def test_writing_is_reproducible(tmp_path):
    write_shards(_rich_samples(), tmp_path / "a", progress=False)
    write_shards(_rich_samples(), tmp_path / "b", progress=False)
    assert (tmp_path / "a" / "shard-000000.tar").read_bytes() == (tmp_path / "b" / "shard-000000.tar").read_bytes()


def test_empty_input_writes_no_shard(tmp_path):
    index = write_shards([], tmp_path, progress=False)
    assert index["shards"] == [] and sorted(os.listdir(tmp_path)) == ["index.json"]


@pytest.mark.parametrize("change,reason", [
    (lambda s: s["json"]["objects"][0].update(box=[0.5, 0.5, 0.1, 0.9]), "box_inverted"),
    (lambda s: s.update({"extra.pyd": b"x"}), "pickle_member"),
    (lambda s: s.update({"cls": b"3"}), "unknown_member"),
    (lambda s: s.pop("png"), "missing_image"),
    (lambda s: s.update({"__key__": "a.b"}), "bad_key"),
])
def test_writer_refuses_invalid_samples(tmp_path, change, reason):
    sample = make_sample("k")
    change(sample)
    with pytest.raises(SchemaError) as info:
        write_shards([sample], tmp_path, progress=False)
    assert info.value.reason == reason


def test_writer_refuses_nan_json_and_duplicate_keys(tmp_path):
    sample = make_sample("k")
    sample["json"]["objects"][0]["box"] = [0.1, float("nan"), 0.5, 0.5]
    with pytest.raises(ValueError):
        write_shards([sample], tmp_path, progress=False)
    with pytest.raises(ValueError, match="duplicate sample key"):
        write_shards([make_sample("k"), make_sample("k")], tmp_path, progress=False)


def test_writer_refuses_object_arrays(tmp_path):
    sample = make_sample("k")
    sample["caption_embeds.npy"] = np.array([{"a": 1}] * 77, dtype=object)
    with pytest.raises(ValueError):  # np.save(allow_pickle=False) refuses object arrays
        write_shards([sample], tmp_path, progress=False)


# -------------------------------------------------------------------------------------------- damaged corpus
class _Payload:
    """Unpickling this creates a file: proof that a loader executed shard content."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _good(key, seed=0):
    return encode_sample(make_sample(key, seed=seed))


def _damaged(key, case, tmp_path):
    raw = _good(key, seed=7)
    ann = annotation()

    def with_json(obj, allow_nan=False):
        raw["json"] = json.dumps(obj, allow_nan=allow_nan).encode()

    def box(b):
        ann["objects"][0]["box"] = b
        with_json(ann, allow_nan=True)

    if case == "corrupt_image":
        raw["png"] = b"\x89PNG\r\n\x1a\n this is not a png"
    elif case == "truncated_image":
        raw["png"] = png_bytes(64, 64)[:300]
        with_json(annotation(width=64, height=64))
    elif case == "image_wrong_format":
        raw["png"] = png_bytes(fmt="JPEG")
    elif case == "missing_json":
        del raw["json"]
    elif case == "malformed_json":
        raw["json"] = b'{"schema_version": 1, "kind": '
    elif case == "nan_box":
        box([0.1, float("nan"), 0.5, 0.5])
    elif case == "inverted_box":
        box([0.5, 0.1, 0.2, 0.6])
    elif case == "zero_area_box":
        box([0.5, 0.1, 0.5, 0.6])
    elif case == "box_out_of_range":
        box([0.5, 0.1, 1.01, 0.6])
    elif case == "keypoint_count":
        ann["persons"] = [{"keypoints": [[0.5, 0.5, 2]] * 16}]
        with_json(ann)
    elif case == "non_utf8_caption":
        raw["txt"] = b"caf\xe9 \xff"
    elif case == "unknown_extension":
        raw["foo.xyz"] = b"whatever"
    elif case == "pyd_pickle":
        raw["pyd"] = pickle.dumps(_Payload(str(tmp_path / "PWNED")))
    elif case == "npy_object_dtype":
        buf = io.BytesIO()
        np.save(buf, np.array([_Payload(str(tmp_path / "PWNED_NPY"))], dtype=object), allow_pickle=True)
        raw["caption_embeds.npy"] = buf.getvalue()
    elif case == "schema_version":
        ann["schema_version"] = 2
        with_json(ann)
    elif case == "missing_image_and_latents":
        del raw["png"]
    elif case == "image_size_mismatch":
        with_json(annotation(width=9, height=8))
    elif case == "bad_embeds_shape":
        buf = io.BytesIO()
        np.save(buf, np.zeros((76, 4), np.float32))
        raw["caption_embeds.npy"] = buf.getvalue()
    elif case == "missing_caption":
        del raw["txt"]
    else:
        raise AssertionError(case)
    return raw


DAMAGE = {
    "corrupt_image": "bad_image",
    "truncated_image": "bad_image",
    "image_wrong_format": "bad_image",
    "missing_json": "missing_json",
    "malformed_json": "bad_json",
    "nan_box": "box_nan",
    "inverted_box": "box_inverted",
    "zero_area_box": "box_zero_area",
    "box_out_of_range": "box_out_of_range",
    "keypoint_count": "bad_keypoint_count",
    "non_utf8_caption": "bad_caption_encoding",
    "unknown_extension": "unknown_member",
    "pyd_pickle": "pickle_member",
    "npy_object_dtype": "pickle_member",
    "schema_version": "schema_version",
    "missing_image_and_latents": "missing_image",
    "image_size_mismatch": "image_size_mismatch",
    "bad_embeds_shape": "bad_embeds_shape",
    "missing_caption": "missing_caption",
}


def _write_raw(path, samples):
    with wds.TarWriter(str(path), encoder=False, mtime=0) as tw:
        for s in samples:
            tw.write(s)
    return str(path)


def test_payloads_are_live():
    """The corpus' pickle payloads really execute when unpickled: the 'file does not exist' checks below mean
    something."""
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        pickle.loads(_damaged("p", "pyd_pickle", __import__("pathlib").Path(d))["pyd"])
        assert os.path.exists(os.path.join(d, "PWNED"))


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_sample_is_skipped_with_reason(tmp_path, case):
    url = _write_raw(tmp_path / "shard-000000.tar", [_good("a"), _damaged("bad", case, tmp_path), _good("b")])
    skips = SkipCounter()
    got = list(iter_samples([url], skips))
    assert _keys(got) == ["a", "b"]
    assert skips.summary() == {DAMAGE[case]: 1}
    assert not os.path.exists(tmp_path / "PWNED") and not os.path.exists(tmp_path / "PWNED_NPY")


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_strict_mode_names_shard_and_key(tmp_path, case):
    url = _write_raw(tmp_path / "shard-000004.tar", [_good("a"), _damaged("bad7", case, tmp_path), _good("b")])
    with pytest.raises(DamagedSampleError) as info:
        list(iter_samples([url], SkipCounter(strict=True)))
    assert info.value.reason == DAMAGE[case] and info.value.key == "bad7" and info.value.url == url
    assert "shard-000004.tar" in str(info.value) and "bad7" in str(info.value)


def test_truncated_tar_counted_once_and_reading_continues(tmp_path):
    full = _write_raw(tmp_path / "shard-000000.tar", [_good(f"t{i}", seed=i) for i in range(4)])
    data = open(full, "rb").read()
    trunc = tmp_path / "shard-000001.tar"
    trunc.write_bytes(data[: len(data) // 2 + 100])  # cuts through a member's data, not at a header boundary
    nxt = _write_raw(tmp_path / "shard-000002.tar", [_good("n0"), _good("n1")])
    skips = SkipCounter()
    keys = _keys(iter_samples([str(trunc), nxt], skips))
    assert skips.summary() == {"truncated_tar": 1}
    assert keys[-2:] == ["n0", "n1"] and 1 <= len(keys) - 2 < 4
    assert keys[:-2] == [f"t{i}" for i in range(len(keys) - 2)]
    with pytest.raises(DamagedSampleError, match="shard-000001.tar"):
        list(iter_samples([str(trunc)], SkipCounter(strict=True)))


def test_unreadable_shard_counted(tmp_path):
    skips = SkipCounter()
    assert list(iter_samples([str(tmp_path / "missing.tar")], skips)) == []
    assert skips.summary() == {"unreadable_shard": 1}


def test_a_missing_shard_directory_is_an_error_when_resolved(tmp_path):
    """A spec naming a local directory that is not there (e.g. train shards never written) fails at once with the
    path, instead of becoming a shard url that every loader worker then counts as unreadable."""
    from gligen.data.shards import resolve_shards

    with pytest.raises(FileNotFoundError, match="train-grounding: no shard directory"):
        resolve_shards(str(tmp_path / "train-grounding"))
    assert resolve_shards("pipe:cat x.tar") == ["pipe:cat x.tar"]  # not a local path: left to the reader


def test_duplicate_member_is_damage(tmp_path):
    import tarfile
    path = tmp_path / "dup.tar"
    good = _good("d")
    with tarfile.open(path, "w") as tf:
        for member in ["json", "png", "png", "txt"]:
            ti = tarfile.TarInfo(f"d.{member}")
            ti.size = len(good[member])
            tf.addfile(ti, io.BytesIO(good[member]))
    skips = SkipCounter()
    assert list(iter_samples([str(path)], skips)) == []
    assert skips.summary() == {"duplicate_member": 1}


def test_skip_logged_once_per_reason_with_url_and_key(tmp_path, caplog):
    url = _write_raw(tmp_path / "s.tar", [_damaged("b1", "corrupt_image", tmp_path),
                                         _damaged("b2", "corrupt_image", tmp_path),
                                         _damaged("b3", "nan_box", tmp_path)])
    skips = SkipCounter()
    with caplog.at_level(logging.WARNING, logger="gligen.data.shards"):
        assert list(iter_samples([url], skips)) == []
    assert skips.summary() == {"bad_image": 2, "box_nan": 1}
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert "bad_image" in messages[0] and url in messages[0] and "b1" in messages[0]
    assert "box_nan" in messages[1] and "b3" in messages[1]


def test_default_webdataset_decode_would_have_run_the_payload(tmp_path):
    """Documents why the safe decoder exists (platform-notes security facts). Our reader, same shard: no file."""
    url = _write_raw(tmp_path / "evil.tar", [_damaged("e", "pyd_pickle", tmp_path)])
    assert list(iter_samples([url], SkipCounter())) == []
    assert not os.path.exists(tmp_path / "PWNED")
    list(wds.WebDataset(url, shardshuffle=False).decode("pil"))
    assert os.path.exists(tmp_path / "PWNED")


def test_truncation_anywhere_is_detected_and_never_yields_a_partial_sample(tmp_path):
    import tarfile
    full = _write_raw(tmp_path / "full.tar", [_good(f"t{i}", seed=i) for i in range(3)])
    data = open(full, "rb").read()
    with tarfile.open(full) as tf:
        last = tf.getmembers()[-1]
    end = last.offset_data + -(-last.size // 512) * 512  # where the end-of-archive zero blocks start
    cuts = sorted(set(range(0, end + 1, 512)) | set(range(100, end, 512)))
    for cut in cuts:
        path = tmp_path / "cut.tar"
        path.write_bytes(data[:cut])
        skips = SkipCounter()
        keys = _keys(iter_samples([str(path)], skips))
        assert skips.summary() == {"empty_shard" if cut == 0 else "truncated_tar": 1}, cut  # 0: a zero-byte file
        assert keys == [f"t{i}" for i in range(len(keys))] and len(keys) < 3, cut
    path.write_bytes(data[: end + 512])  # one zero block is a proper end for tarfile
    skips = SkipCounter()
    assert _keys(iter_samples([str(path)], skips)) == ["t0", "t1", "t2"] and skips.summary() == {}


def test_oversized_member_not_read(tmp_path):
    from gligen.data.decode import DataLimits
    a, b, big = _good("a"), _good("b"), _good("big")
    cap = max(len(v) for sample in (a, b, big) for m, v in sample.items() if m != "__key__")
    big["txt"] = b"x" * (cap + 1)
    url = _write_raw(tmp_path / "s.tar", [a, big, b])
    skips = SkipCounter()
    assert _keys(iter_samples([url], skips, DataLimits(max_member_bytes=cap))) == ["a", "b"]
    assert skips.summary() == {"member_too_large": 1}
