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
