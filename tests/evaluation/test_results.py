import subprocess

from gligen.evaluation.results import mean_std_table
from gligen.provenance import config_hash, git_commit


def git(cwd, *args):
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


def test_git_commit_marks_changed_or_new_code_dirty_but_not_new_result_files(tmp_path, monkeypatch):
    git(tmp_path, "init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    git(tmp_path, "add", "a.py")
    git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    monkeypatch.chdir(tmp_path)
    assert not git_commit().endswith("+dirty")
    (tmp_path / "metrics.csv").write_text("tau\n0\n")  # results being written do not make the code dirty
    assert not git_commit().endswith("+dirty")
    (tmp_path / "new_script.py").write_text("y = 2\n")  # an uncommitted script does
    assert git_commit().endswith("+dirty")
    (tmp_path / "new_script.py").unlink()
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "summary.md").write_text("old\n")
    git(tmp_path, "add", "results/summary.md")
    git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "results")
    (tmp_path / "results" / "summary.md").write_text("new\n")  # rewriting committed results is not a code change
    assert not git_commit().endswith("+dirty")
    (tmp_path / "a.py").write_text("x = 2\n")
    assert git_commit().endswith("+dirty")


def test_config_hash_ignores_key_order_and_table_reports_mean_and_std():
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1}) != config_hash({"a": 2})
    rows = [{"tau": 0.0, "ap": 0.1}, {"tau": 0.0, "ap": 0.3}, {"tau": 1.0, "ap": 0.5}]
    table = mean_std_table(rows, "tau", ["ap"])
    assert "| 0.0 | 2 | 0.200 ± 0.141 |" in table and "| 1.0 | 1 | 0.500 ± 0.000 |" in table


def test_command_line_is_quoted_so_it_can_be_pasted_back(monkeypatch):
    import shlex

    from gligen.evaluation.reporting import command_line

    monkeypatch.setattr("sys.argv", ["experiments/ablate_beta.py", "--taus", "0", "1", "--out", "my results"])
    line = command_line()
    assert shlex.split(line) == ["python", "experiments/ablate_beta.py", "--taus", "0", "1", "--out", "my results"]
    assert command_line(["--x", "a b"], program="experiments/bench_train.py") == \
        "python experiments/bench_train.py --x 'a b'"
    monkeypatch.setattr("sys.argv", [""])
    assert command_line() == "(library call)"


def test_rows_keep_their_layout_records_through_csv_and_an_image_scorer_adds_per_image_means(tmp_path):
    """score(): an image scorer's metric is the mean over the images it applies to, with records that resample it;
    write_rows / read_rows carry every row's records through metrics.csv + layout_records.json.gz (byte-identical
    when rewritten), and rows whose records are lost keep their values without records."""
    import numpy as np

    from gligen.evaluation.generate import score
    from gligen.evaluation.results import read_rows, write_rows
    from gligen.modalities import get_modality

    images = [np.zeros((32, 32, 3), dtype=np.uint8) for _ in range(4)]
    images[0][8:20, 8:20] = (255, 0, 0)
    layouts = [{"caption": "a red square", "objects": [{"box": [0.25, 0.25, 0.625, 0.625], "category": "red square",
                                                        "phrase": "a red square"}]}] + \
              [{"caption": "", "objects": []} for _ in range(3)]

    def scorer(images, layouts):
        return {"brightness": [float(im.mean()) if layout["objects"] else None for im, layout in zip(images, layouts)]}

    metrics, records = score(get_modality("box"), images, layouts, None, scorer)
    assert metrics["brightness"] == float(images[0].mean()) and metrics["ap50"] == 1.0
    assert records.mismatches(metrics) == []
    weights = np.array([[2, 0, 1, 1], [0, 1, 1, 2]], dtype=float)
    assert list(records.values("brightness", weights)) == [float(images[0].mean()), 0.0]  # no applicable image: 0
    rows = [{"tau": 0.0, "seed": 0, **metrics, "layout_records": records},
            {"tau": 1.0, "seed": 0, **metrics, "layout_records": records}]
    write_rows(rows, tmp_path / "metrics.csv")
    first = (tmp_path / "layout_records.json.gz").read_bytes()
    read = read_rows(tmp_path / "metrics.csv")
    assert [float(r["ap50"]) for r in read] == [1.0, 1.0] and read[0]["layout_records"] is read[1]["layout_records"]
    assert np.array_equal(read[0]["layout_records"].values("ap50", weights), records.values("ap50", weights))
    write_rows(read, tmp_path / "metrics.csv")
    assert (tmp_path / "layout_records.json.gz").read_bytes() == first
    (tmp_path / "layout_records.json.gz").unlink()
    assert all("layout_records" not in r for r in read_rows(tmp_path / "metrics.csv"))


def test_records_of_the_same_content_in_two_folders_are_resampled_once_and_an_edited_copy_is_not(tmp_path,
                                                                                                  monkeypatch):
    """read_rows shares resampled values between records of one content (a table and its cells hold the same
    records): the content's id is computed from what is read, so a copy edited by hand under the old id is its own."""
    import gzip
    import json

    import numpy as np

    from gligen.evaluation.results import read_rows, write_rows
    from gligen.metrics.resample import APRecords, RowRecords

    calls = []
    real = APRecords.values
    monkeypatch.setattr(APRecords, "values", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    records = RowRecords()
    records.add("box", APRecords([{"det": [[0, 0.9, 1, 0]], "gt": {0: 1}}, {"det": [[0, 0.8, 0, 1]], "gt": {0: 1}}],
                                 [0.5], [0.0, 0.5, 1.0]), {"ap50": "ap50"})
    for name in ("a", "b", "edited"):
        (tmp_path / name).mkdir()
        write_rows([{"tau": 1.0, "ap50": 0.5, "layout_records": records}], tmp_path / name / "metrics.csv")
    path = tmp_path / "edited" / "layout_records.json.gz"
    stored = json.loads(gzip.decompress(path.read_bytes()))
    (entry,) = stored.values()
    entry["families"]["box"]["images"][1]["det"][0][2:] = [1, 0]  # the second detection now a true positive too
    path.write_bytes(gzip.compress(json.dumps(stored).encode()))

    weights = np.array([[2.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    key = (2, 3, 12345)  # a cache key no other test uses: the shared values live as long as the process
    expected = records.values("ap50", weights)
    calls.clear()
    a, b, edited = (read_rows(tmp_path / name / "metrics.csv")[0]["layout_records"] for name in ("a", "b", "edited"))
    assert a is not b
    first = a.values("ap50", weights, cache_key=key)
    assert len(calls) == 1 and list(first) == list(expected)
    assert b.values("ap50", weights, cache_key=key) is first and len(calls) == 1  # b: a's values
    assert not first.flags.writeable  # shared: no caller may change another folder's values in place
    changed = edited.values("ap50", weights, cache_key=key)
    assert len(calls) == 2 and changed[1] > first[1]  # the edited copy is computed on its own content
