"""gligen.provenance: the fingerprint of training shards tells shard sets apart and needs local files."""

from gligen.provenance import files_fingerprint


def test_files_fingerprint_changes_with_content_name_and_size(tmp_path):
    a, b = tmp_path / "a.tar", tmp_path / "b.tar"
    a.write_bytes(b"x" * 100_000)
    b.write_bytes(b"y" * 10)
    first = files_fingerprint([str(a), str(b)])
    assert first == files_fingerprint([str(b), str(a)])  # order of the list does not matter
    a.write_bytes(b"x" * 99_999 + b"z")  # one byte at the end (in the last 64 KiB)
    assert files_fingerprint([str(a), str(b)]) != first
    assert files_fingerprint([str(a)]) != files_fingerprint([str(a), str(b)])
    assert files_fingerprint([str(a), "https://host/shard-000000.tar"]) is None  # not a local file: unknown
