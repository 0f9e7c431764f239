"""gligen.evaluation.stats on synthetic data with known answers: the two-level bootstrap interval covers the true
mean / difference at about the stated rate, paired comparisons cancel the shared training-seed effect, and one
training seed gives no training spread."""

import numpy as np
import pytest

from gligen.evaluation import stats
from gligen.metrics.resample import MeanRecords, RowRecords


def synthetic_rows(rng, mean, train_sd, sample_sd, n_train, n_sample, arm="a", train_effects=None):
    effects = rng.normal(0, train_sd, n_train) if train_effects is None else train_effects
    return [{"arm": arm, "train_seed": t, "seed": s, "m": mean + effects[t] + rng.normal(0, sample_sd)}
            for t in range(n_train) for s in range(n_sample)], effects


def test_interval_of_a_mean_covers_the_truth_at_about_95_percent():
    rng = np.random.default_rng(0)
    hits, draws = 0, 300
    for i in range(draws):
        rows, _ = synthetic_rows(rng, 0.5, 0.05, 0.02, n_train=20, n_sample=3)
        s = stats.summarize(rows, "arm", "m", seed=i, samples=400)["a"]
        hits += s["low"] <= 0.5 <= s["high"]
    # percentile bootstrap over 20 clusters: a little under nominal; far from it would mean a wrong resampling level
    assert 0.88 <= hits / draws <= 0.99, hits / draws


def test_unpaired_difference_interval_covers_the_true_difference():
    rng = np.random.default_rng(1)
    hits, draws = 0, 200
    for i in range(draws):
        a, _ = synthetic_rows(rng, 0.30, 0.05, 0.02, 20, 2, arm="a")
        b, _ = synthetic_rows(rng, 0.36, 0.05, 0.02, 20, 2, arm="b")
        b = [{**r, "train_seed": r["train_seed"] + 100} for r in b]  # other models: other training seeds
        c = stats.compare(a + b, "arm", "a", "b", "m", seed=i, samples=400)
        assert not c["paired"]
        hits += c["low"] <= 0.06 <= c["high"]
    assert 0.88 <= hits / draws <= 0.99, hits / draws


def test_paired_comparison_removes_the_shared_training_seed_effect():
    rng = np.random.default_rng(2)
    a, effects = synthetic_rows(rng, 0.30, 0.10, 0.005, 5, 3, arm="0.0")
    b, _ = synthetic_rows(rng, 0.32, 0.10, 0.005, 5, 3, arm="1.0", train_effects=effects)  # same models
    paired = stats.compare(a + b, "arm", "0.0", "1.0", "m")
    assert paired["paired"] and paired["excludes_zero"] and paired["difference"] == pytest.approx(0.02, abs=0.01)
    # the same numbers as different models: the training spread (0.10) swamps a 0.02 difference
    b_unpaired = [{**r, "train_seed": r["train_seed"] + 100} for r in b]
    unpaired = stats.compare(a + b_unpaired, "arm", "0.0", "1.0", "m")
    assert not unpaired["paired"] and not unpaired["excludes_zero"]
    assert unpaired["high"] - unpaired["low"] > 5 * (paired["high"] - paired["low"])


def test_one_training_seed_has_no_training_spread_and_says_so():
    rows = [{"tau": 1.0, "seed": s, "m": v} for s, v in enumerate([0.8, 0.82, 0.81])]  # no train_seed column
    s = stats.summarize(rows, "tau", "m")["1.0"]
    assert s["n_train"] == 1 and s["std_train"] == 0.0 and s["mean"] == pytest.approx(0.81)
    assert s["low"] < 0.81 < s["high"]  # sampling noise only
    table = stats.interval_table(rows, "tau", ["m"])
    assert "| 1.0 | 1 | 0.810 ± 0.000 [" in table


def test_comparison_table_marks_differences_that_exclude_zero():
    rows = [{"tau": t, "train_seed": k, "seed": s, "m": t + 0.01 * k + 0.001 * s}
            for t in (0.0, 0.5) for k in range(3) for s in range(2)]
    table = stats.comparison_table(stats.comparisons(rows, "tau", "0.0", ["m"]), "tau", "0.0")
    assert "| 0.5 | +0.500 [+0.500, +0.500] * |" in table


def test_a_metric_no_arm_moves_is_flagged_as_not_a_headline():
    rng = np.random.default_rng(3)
    rows = [{"tau": t, "train_seed": k, "seed": s, "moves": t + rng.normal(0, 0.01),
             "saturated": 1.0, "noise": rng.normal(0.5, 0.05)}
            for t in (0.0, 1.0) for k in range(4) for s in range(3)]
    found = stats.comparisons(rows, "tau", "0.0", ["moves", "saturated", "noise"])
    assert stats.indistinct_metrics(found) == ["saturated", "noise"]


def test_paired_false_forces_unpaired_arms_that_share_seed_numbers():
    """Different models under the same seed numbers (the gamma_init arms of a grid): the automatic rule pairs them,
    paired=False resamples each arm on its own, which with a strong shared per-seed offset is far wider."""
    rng = np.random.default_rng(4)
    a, effects = synthetic_rows(rng, 0.30, 0.10, 0.005, 5, 3, arm="0.0")
    b, _ = synthetic_rows(rng, 0.32, 0.10, 0.005, 5, 3, arm="1.0", train_effects=effects)  # same seed keys
    auto = stats.compare(a + b, "arm", "0.0", "1.0", "m")
    unpaired = stats.compare(a + b, "arm", "0.0", "1.0", "m", paired=False)
    assert auto["paired"] and not unpaired["paired"]
    assert unpaired["difference"] == pytest.approx(auto["difference"])
    assert unpaired["high"] - unpaired["low"] > 5 * (auto["high"] - auto["low"])
    assert stats.compare(a + b, "arm", "0.0", "1.0", "m", paired=True) == auto
    assert stats.comparisons(a + b, "arm", "0.0", ["m"], paired=False)["m"]["1.0"] == unpaired
    assert stats.comparisons(a + b, "arm", "0.0", ["m"])["m"]["1.0"] == auto  # None: today's rule
    other_models = [{**r, "train_seed": r["train_seed"] + 100} for r in b]
    with pytest.raises(ValueError, match="same training and sampling seeds"):
        stats.compare(a + other_models, "arm", "0.0", "1.0", "m", paired=True)


# ----- the third level: layouts (rows with layout records, gligen.metrics.resample) ---------------------------------

def layout_rows(values_by_row: dict, arm_key: str = "arm"):
    """Rows whose metric `m` is the mean of per-layout values, with MeanRecords to resample them."""
    rows = []
    for (arm, train_seed, seed), values in values_by_row.items():
        records = RowRecords()
        records.add("m", MeanRecords(values, np.ones(len(values))), {"m": "mean"})
        rows.append({arm_key: arm, "train_seed": train_seed, "seed": seed, "m": float(np.mean(values)),
                     "layout_records": records})
    return rows


def test_resampling_layouts_covers_the_truth_that_one_model_and_seed_cannot():
    """One trained model, one sampling seed, 100 layouts: without layout records the interval has no width; with
    them it covers the true mean at about the stated rate."""
    rng = np.random.default_rng(7)
    hits, draws = 0, 200
    for i in range(draws):
        values = rng.normal(0.5, 0.2, 100)
        with_records = stats.summarize(layout_rows({("a", 0, 0): values}), "arm", "m", seed=i, samples=400)["a"]
        hits += with_records["low"] <= 0.5 <= with_records["high"]
        assert with_records["layouts_resampled"]
    plain = stats.summarize([{"arm": "a", "train_seed": 0, "seed": 0, "m": 0.5}], "arm", "m")["a"]
    assert plain["low"] == plain["high"] and not plain["layouts_resampled"]
    assert 0.88 <= hits / draws <= 0.99, hits / draws


def test_paired_arms_resample_the_same_layouts():
    """Two tau of one model on the same 100 layouts: a large per-layout effect shared by both arms and a small
    constant difference. Paired over layouts the difference's interval is tight and excludes 0; each arm's own
    interval is wide (the layout spread)."""
    rng = np.random.default_rng(8)
    layout_effect = rng.normal(0, 0.3, 100)
    rows = layout_rows({("0.0", 0, 0): 0.3 + layout_effect, ("1.0", 0, 0): 0.32 + layout_effect})
    diff = stats.compare(rows, "arm", "0.0", "1.0", "m")
    assert diff["paired"] and diff["layouts_resampled"] and diff["excludes_zero"]
    assert diff["high"] - diff["low"] < 1e-9 + 0.001  # the shared layout effect cancels draw by draw
    alone = stats.summarize(rows, "arm", "m")["0.0"]
    assert alone["high"] - alone["low"] > 0.05
    # unpaired arms still share the layouts' draws: the layout effect cancels there too
    unpaired = stats.compare(rows, "arm", "0.0", "1.0", "m", paired=False)
    assert unpaired["excludes_zero"] and unpaired["high"] - unpaired["low"] < 0.001



def test_the_beta_verdict_names_the_tau_that_keeps_placement_and_style():
    from gligen.evaluation.reporting import beta_verdict

    def rows(style, placement):
        return [{"tau": t, "style_adherence": s, "coarse_ap50": p, "train_seed": k, "seed": 0}
                for t, s, p in zip((0.0, 0.3, 0.5, 1.0), style, placement) for k in range(3)]

    trade = beta_verdict(rows((0.9, 0.85, 0.6, 0.2), (0.0, 0.8, 0.85, 0.9)), "coarse_ap50")
    assert trade.startswith("tau = 0.3 keeps 89% of full grounding's placement gain and avoids 93% of its style loss")
    assert "coarse_ap50 0.800 and style_adherence 0.850 at tau 0.3" in trade
    kept = beta_verdict(rows((0.9, 0.95, 0.6, 0.2), (0.0, 0.85, 0.85, 0.9)), "coarse_ap50")  # style above tau 0's
    assert kept.startswith("tau = 0.3 keeps 94% of full grounding's placement gain and avoids all of its style loss")
    flat = beta_verdict(rows((0.9, 0.9, 0.88, 0.88), (0.0, 0.5, 0.8, 0.9)), "coarse_ap50")
    assert flat.startswith("No trade-off to make here") and "tau = 1 is best" in flat
    assert beta_verdict([{"tau": 0.0, "coarse_ap50": 0.1}], "coarse_ap50") is None  # no style asked
