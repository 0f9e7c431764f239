"""reporting.write_grid_summary on synthetic grid summary rows (the rows of experiments/grid.py collect: `seed` the
cell's training seed, `sample_seed` the sampling seed) with known values: the interval table per gamma_init at the
smallest and largest tau, unpaired gamma_init differences, paired tau differences, and a grid not swept yet."""

from gligen.evaluation import reporting

TRAIN_SEEDS, TAUS = (0, 1, 2), (0.0, 0.5, 1.0)


def box_rows() -> list[dict]:
    """coarse_ap50 = 0.1 + 0.4 tau + 0.2 gamma + 0.01 training seed + 0.002 sampling seed; fid = 50 - 10 tau + 5 gamma.
    Plus a gamma 0.25 cell trained but not swept (one row, no tau)."""
    rows = [{"cell": f"gamma{g:g}_box_seed{t}", "gamma_init": g, "modality": "box", "seed": t, "tau": tau,
             "sample_seed": s, "sweep_status": "done", "ap50": 0.5, "coarse_ap50": 0.1 + 0.4 * tau + 0.2 * g
             + 0.01 * t + 0.002 * s, "pck": None, "fid": 50 - 10 * tau + 5 * g, "kid": 0.01, "status": "done",
             "git_commit": "abc123", "config_hash": "h", "gate_attn_mean_final": 0.1 + 0.6 * g + 0.01 * t}
            for g in (0.0, 1.0) for t in TRAIN_SEEDS for tau in TAUS for s in (0, 1)]
    return rows + [{"cell": "gamma0.25_box_seed0", "gamma_init": 0.25, "modality": "box", "seed": 0, "tau": None,
                    "sample_seed": None, "sweep_status": "missing", "ap50": None, "coarse_ap50": None, "fid": None,
                    "status": "done", "git_commit": "def456", "config_hash": "h", "gate_attn_mean_final": 0.3}]


def _split(text: str, headings: list[str]) -> list[str]:
    parts = [text]
    for heading in headings:
        parts[-1:] = parts[-1].split(heading)
    assert len(parts) == len(headings) + 1, headings
    return parts


def test_grid_summary_tables_hold_the_known_intervals_and_differences(tmp_path):
    path = reporting.write_grid_summary(tmp_path, box_rows(), "python experiments/grid.py collect")
    text = path.read_text()
    assert path == tmp_path / "summary.md"
    assert "Command: `python experiments/grid.py collect`" in text and "`abc123`, `def456`" in text
    assert "7/7 cells trained, 6 swept (36 rows" in text
    assert "## box" in text and "Grounding metric: coarse_ap50" in text
    _, at_0, at_1, tau_diff = _split(text, ["### tau = 0 (the base LDM: no grounding): per gamma_init",
                                            "### tau = 1 (grounding at every step): per gamma_init",
                                            "### tau = 1 minus tau = 0, per gamma_init"])
    # per gamma_init at tau 0: mean over training seeds 0.1 + 0.2 g + 0.01 + 0.001, std over seeds 0.01
    assert "3 training seeds per arm, each arm its own trained models" in at_0
    assert "| gamma_init | training seeds | coarse_ap50 | fid |" in at_0
    assert "| 0.0 | 3 | 0.111 ± 0.010 [" in at_0 and "| 1.0 | 3 | 0.311 ± 0.010 [" in at_0
    assert "| 0.0 | 3 | 0.511 ± 0.010 [" in at_1 and "| 1.0 | 3 | 0.711 ± 0.010 [" in at_1
    # gamma 1 - gamma 0: +0.2 and +5, unpaired (the shared training-seed offset is not cancelled: a real interval)
    assert "Differences from gamma_init = 0.0" in at_0 and "unpaired: every gamma_init is a different" in at_0
    row = next(line for line in at_0.splitlines() if line.startswith("| 1.0 | +"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[0] == "1.0" and cells[1].startswith("+0.200 [") and cells[2] == "+5.000 [+5.000, +5.000] *"
    low, high = (float(x) for x in cells[1].split("[")[1].rstrip("] *").split(","))
    assert low < 0.2 - 0.005 and high > 0.2 + 0.005  # a paired difference would be exactly +0.200
    # tau 1 - tau 0 per gamma_init, paired: the per-seed offsets cancel, +0.4 exactly, FID -10
    assert "paired: the same model and sampling seeds at both tau; 3 training seeds per gamma_init" in tau_diff
    assert "| gamma_init: tau 1 - tau 0 | coarse_ap50 | fid |" in tau_diff
    for gamma in ("0.0", "1.0"):
        assert f"| {gamma} | +0.400 [+0.400, +0.400] * | -10.000 [-10.000, -10.000] * |" in tau_diff
    assert "0.25" not in at_0 + at_1 + tau_diff  # the cell not swept is left out of the grounding tables


def test_grid_summary_of_a_grid_not_swept_says_so(tmp_path):
    rows = [r for r in box_rows() if r["tau"] is None]
    text = reporting.write_grid_summary(tmp_path, rows, "cmd").read_text()
    assert "1/1 cells trained, 0 swept (0 rows" in text and "No cell is swept yet" in text
    assert "No cell is swept yet" in text and "### tau" not in text  # no grounding tables


def test_grid_summary_has_the_training_per_gamma_init_over_training_seeds(tmp_path):
    """gate_attn_mean_final = 0.1 + 0.6 gamma + 0.01 training seed: one value per trained cell."""
    text = reporting.write_grid_summary(tmp_path, box_rows(), "cmd").read_text()
    training = text.split("## box: training, per gamma_init")[1].split("## box\n")[0]
    assert "| gamma_init | training seeds | gate_attn_mean_final |" in training
    assert "| 0.0 | 3 | 0.110 ± 0.010 [" in training and "| 1.0 | 3 | 0.710 ± 0.010 [" in training
    assert "| 1.0 | +0.600 [" in training  # gamma 1 - gamma 0, unpaired
    rows = [r for r in box_rows() if r["tau"] is None]  # not swept: the training table is still there
    text = reporting.write_grid_summary(tmp_path, rows, "cmd").read_text()
    assert "| 0.25 | 1 | 0.300 ± 0.000 [0.300, 0.300] |" in text
