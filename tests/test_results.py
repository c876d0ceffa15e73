"""moco_mgd.reporting.results: a run's numbers from its real log files, and the mean ± std table."""
import math

import pytest

from moco_mgd.runtime.logs import MetricsLog
from moco_mgd.reporting.results import read_result, results_table, run_result, summarize, write_result


def _run(tmp_path, knn_top1s, linear_top1s):
    pretrain, lincls = tmp_path / "pretrain", tmp_path / "lincls"
    for directory in (pretrain, lincls):
        directory.mkdir()
    log = MetricsLog(pretrain, True)
    log.log("knn_teacher", epoch=0, top1=99.0, top5=100.0)
    for epoch, top1 in enumerate(knn_top1s, 1):
        log.log("epoch", epoch=epoch - 1, infonce=5.0)
        log.log("knn", epoch=epoch, top1=top1, top5=100.0)
    log = MetricsLog(lincls, True)
    for epoch, top1 in enumerate(linear_top1s):
        log.log("epoch", epoch=epoch, top1=top1, top5=100.0, loss=1.0)
    return pretrain, lincls


def test_run_result_takes_the_last_knn_and_the_last_linear_epoch(tmp_path):
    pretrain, lincls = _run(tmp_path, [60.0, 70.5], [80.0, 90.0, 85.25])
    result = run_result(pretrain, lincls, method="baseline", seed=1)
    # The last epoch, not the best: the best is picked on the very set it is reported on.
    assert result == {"method": "baseline", "seed": 1, "knn_top1": 70.5, "knn_epoch": 2, "linear_top1": 85.25}


def test_run_result_of_an_unfinished_run_says_so(tmp_path):
    pretrain, lincls = _run(tmp_path, [], [80.0])
    with pytest.raises(ValueError, match="no 'knn' record.*did not finish"):
        run_result(pretrain, lincls)


def test_write_and_read_result(tmp_path):
    assert read_result(tmp_path) is None
    write_result(tmp_path, {"method": "mgd-amp", "knn_top1": 1.5})
    assert read_result(tmp_path) == {"method": "mgd-amp", "knn_top1": 1.5}
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]  # no temporary file left


def test_summarize_is_mean_and_sample_std():
    mean, std, n = summarize([1.0, 2.0, 6.0])
    assert (mean, n) == (3.0, 3) and std == pytest.approx(math.sqrt(((4 + 1 + 9) / 2)))
    mean, std, n = summarize([4.0])
    assert (mean, n) == (4.0, 1) and math.isnan(std)
    with pytest.raises(ValueError, match="no finished run"):
        summarize([])


def _result(method, seed, knn, linear):
    return {"method": method, "seed": seed, "knn_top1": knn, "linear_top1": linear, "pretrain_seconds": 100.0,
            "eval_seconds": 10.0}


def test_results_table_rows_in_method_order_with_mean_and_std():
    results = [_result("mgd-amp", 1, 72.0, 80.0), _result("teacher", 0, 75.0, 81.0),
               _result("mgd-amp", 0, 70.0, 82.0)]
    table = results_table(results, ["teacher", "baseline", "mgd-amp"], {"mgd-amp": "MGD-AMP"}).splitlines()
    assert table[0] == "| method | seeds | kNN top-1 | linear top-1 | pretrain s | eval s |"
    assert len(table) == 4  # header, rule, teacher, MGD-AMP: the baseline has no result and no row
    assert table[2] == "| teacher | 0 | 75.00 | 81.00 | 100 | 10 |"   # one run: no ± at all
    assert table[3] == "| MGD-AMP | 0,1 | 71.00 ± 1.41 | 81.00 ± 1.41 | 100 ± 0 | 10 ± 0 |"


def test_paired_differences_against_the_baseline_of_the_same_seed():
    results = [_result("baseline", 0, 70.0, 80.0), _result("baseline", 1, 74.0, 82.0), _result("baseline", 2, 72.0, 81.0),
               _result("mgd-amp", 0, 71.0, 80.5), _result("mgd-amp", 1, 75.5, 82.0), _result("mgd-amp", 2, 72.5, 81.0),
               _result("teacher", 0, 65.0, 70.0)]
    from moco_mgd.reporting.results import paired_differences

    assert paired_differences(results, "mgd-amp", "knn_top1") == [1.0, 1.5, 0.5]
    table = results_table(results, ["teacher", "baseline", "mgd-amp", "random"], {"baseline": "base"}).splitlines()
    assert table[0] == ("| method | seeds | kNN top-1 | linear top-1 | Δ kNN vs baseline | Δ linear vs baseline | pretrain s "
                        "| eval s |")
    rows = {line.split(" | ")[0]: line.split(" | ") for line in table[2:]}
    # MGD-AMP is 1.00 ± 0.50 better per seed, while each mean spreads by about 2 over the seeds.
    # The 95% t-interval of the mean difference: 1.00 ± t(0.975, 2) * 0.50 / sqrt(3), t = 4.303.
    assert rows["| mgd-amp"][2:6] == ["73.00 ± 2.29", "81.17 ± 0.76", "+1.00 ± 0.50 [-0.24, +2.24]",
                                      "+0.17 ± 0.29 [-0.55, +0.88]"]
    assert rows["| teacher"][4:6] == ["-5.00", "-10.00"]          # its one seed against baseline seed 0
    assert rows["| base"][4:6] == ["", ""]


def test_summary_line_says_whether_the_teacher_is_better_and_the_student_wins():
    from moco_mgd.reporting.results import summary_line

    def r(method, seed, knn, linear):
        return {"method": method, "seed": seed, "knn_top1": knn, "linear_top1": linear}

    results = [r("teacher", 0, 85.0, 86.0), r("baseline", 0, 70.0, 72.0), r("baseline", 1, 72.0, 73.0),
               r("mgd-amp", 0, 73.0, 74.0), r("mgd-amp", 1, 74.0, 73.5), r("random", 0, 74.5, 76.0)]
    titles = {"teacher": "supervised resnet50 teacher", "mgd-amp": "MGD-AMP"}
    line = summary_line(results, "mgd-amp", titles)
    # Differences 3, 2 (kNN) and 2, 0.5 (linear): t(0.975, 1) = 12.706, std / sqrt(2) = 0.5 and 0.75. Both
    # intervals span 0, so two seeds do not show a win, whatever the means say. Against random weights
    # every row is paired with seed 0's: baseline 70 - 74.5 and 72 - 76.
    assert line == ("In short: the supervised resnet50 teacher is better than the baseline student (kNN 85.00 vs "
                    "71.00); MGD-AMP does not beat it (the kNN and linear gains' 95% CIs include 0): +2.50 kNN (95% CI "
                    "-3.85 to +8.85), +1.25 linear top-1 (95% CI -8.28 to +10.78) against the baseline of the same seed "
                    "(2 seeds); against random weights (kNN 74.50, linear 76.00): supervised resnet50 teacher above them "
                    "on both probes (+10.50 kNN, +10.00 linear), baseline BELOW them on both probes (-4.50 kNN, -4.00 "
                    "linear), MGD-AMP BELOW them on both probes (-1.50 kNN, -2.00 linear).")
    # Three seeds: kNN differences 2, 2.1, 2 (interval well above 0), linear 0.5, -0.5, 0.3 (spans 0).
    three = [r("baseline", s, 70.0 + s, 72.0) for s in range(3)] + [r("random", s, 71.0 + s, 71.5) for s in range(3)] \
        + [r("mgd-amp", 0, 72.0, 72.5), r("mgd-amp", 1, 73.1, 71.5), r("mgd-amp", 2, 74.0, 72.3)]
    line = summary_line(three, "mgd-amp", titles)
    assert "MGD-AMP beats it on kNN only (its linear gain's 95% CI includes 0): +2.03 kNN (95% CI +1.89 to " \
           "+2.18), +0.10 linear top-1 (95% CI -1.21 to +1.41)" in line, line
    # Against random weights the baseline is 1 lower on kNN in every seed (a zero-width interval below 0) and
    # 0.5 higher on linear: BELOW on both would be wrong, above on one would be too.
    assert "baseline above on the linear probe only (-1.00 kNN (95% CI -1.00 to -1.00), +0.50 linear" in line, line
    # Differences 1, -1, 0.2: mean 0.07, std 1.007, half-width 4.303 * 1.007 / sqrt(3) = 2.50.
    level = summary_line(three[:6] + [r("mgd-amp", s, 71.0 + s + d, 71.5 + d) for s, d in enumerate((1.0, -1.0, 0.2))],
                         "mgd-amp", titles)
    assert "MGD-AMP not above them on either probe (+0.07 kNN (95% CI -2.43 to +2.57)" in level, level
    assert "floor" not in line   # never called the floor: trained rows can be below it
    worse = summary_line([r("teacher", 0, 60.0, 60.0), r("baseline", 0, 70.0, 72.0), r("mgd-amp", 0, 69.0, 73.0)],
                         "mgd-amp", titles)
    assert "is WORSE than the baseline" in worse and "MGD-AMP beats it on the linear probe only: -1.00 kNN, +1.00 linear" in worse
    assert "(1 seed)" in worse and "random weights" not in worse and "CI" not in worse
    for student, verdict in (((71.0, 71.0), "MGD-AMP beats it on kNN only: +1.00 kNN, -1.00 linear"),
                             ((70.0, 72.0), "MGD-AMP does not beat it: +0.00 kNN, +0.00 linear")):
        line = summary_line([r("baseline", 0, 70.0, 72.0), r("mgd-amp", 0, *student)], "mgd-amp", titles)
        assert verdict in line, line
    assert summary_line([], "mgd-amp", titles) == "In short: no finished run to compare."
    alone = summary_line([r("teacher", 0, 85.0, 86.0), r("baseline", 0, 70.0, 72.0)], "baseline", titles)
    assert "beat" not in alone and "is better than the baseline student" in alone   # no student to compare


def test_print_table_is_markdown_with_text_columns_left_and_numbers_right(capsys):
    from moco_mgd.reporting.timing import print_table

    print_table(["what", "solver", "ms"], [("a", "lapjv", "1.5"), ("b", "scipy", 12)], align="llr")
    assert capsys.readouterr().out.splitlines() == [
        "| what | solver | ms |", "|---|---|---:|", "| a | lapjv | 1.5 |", "| b | scipy | 12 |"]
    print_table(["what", "ms"], [("a", 1)])
    assert capsys.readouterr().out.splitlines()[1] == "|---|---:|"
    with pytest.raises(ValueError, match="align 'l' has 1 letters for 2 columns"):
        print_table(["what", "ms"], [], align="l")
