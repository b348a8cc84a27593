"""The spread and ranking rule of repeated benchmark runs, and terminal table fitting (pure, no models)."""
import pytest

from moespec.bench import report, timing


def test_spread_median_min_max():
    s = timing.spread([1.0, 0.8, None, 1.2])
    assert s == {"n": 3, "median": 1.0, "min": 0.8, "max": 1.2, "rel_range": pytest.approx(0.4)}
    assert timing.spread([]) == {"n": 0, "median": None, "min": None, "max": None, "rel_range": None}
    assert timing.spread([2.0, 4.0])["median"] == 3.0


@pytest.mark.parametrize("a,b,relation", [
    ((0.70, 0.75), (0.80, 0.90), "ordered"),      # disjoint
    ((0.80, 0.90), (0.70, 0.75), "ordered"),      # either order
    ((0.50, 0.52), (0.51, 0.54), "tie"),          # overlapping, all within 10 %
    ((1.00, 1.00), (0.95, 1.04), "tie"),          # ar against a mode within 10 % of it
    ((0.50, 0.55), (0.50, 0.55), "tie"),          # boundary: max = 1.1 x min
    ((0.58, 1.06), (0.67, 1.22), "undetermined"),  # the issue's busy-machine example
    ((1.00, 1.00), (0.80, 1.20), "undetermined"),  # can't tell whether it beats autoregressive
])
def test_pair_relation(a, b, relation):
    assert timing.pair_relation(a, b) == relation


def test_rank_check_flags_the_noisy_run_of_the_issue():
    # Static K=4 at 1.22x then 0.67x, Cascade at 1.06x then 0.58x: no order can be read from that.
    names = ["ar", "static K=4", "cascade"]
    check = timing.rank_check(names, [[1, 1, 1], [1.22, 0.67, 0.95], [1.06, 0.58, 0.80]])
    assert check["checked"] and check["flagged"]
    assert check["undetermined"] == [0, 1, 2]
    rel = {(p["a"], p["b"]): p["relation"] for p in check["pairs"]}
    assert rel[("static K=4", "cascade")] == "undetermined"
    assert "disjoint" in check["rule"] and "1 + 0.1" in check["rule"] and "10 %" in check["rule"]


def test_rank_check_clean_and_tied_runs_are_not_flagged():
    names = ["ar", "static K=2", "static K=8", "budget K=8 C=16", "cascade"]
    per_repeat = [[1.0] * 3, [0.81, 0.80, 0.82], [0.50, 0.51, 0.49], [0.49, 0.50, 0.51], [0.90, 0.92, 0.91]]
    check = timing.rank_check(names, per_repeat)
    assert check["checked"] and not check["flagged"] and check["undetermined"] == []
    # static K=8 and budget K=8 C=16 do the same work: a tie, listed but not flagged.
    assert [(p["a"], p["b"], p["relation"]) for p in check["pairs"]] == [("static K=8", "budget K=8 C=16", "tie")]


def test_rank_check_marks_only_the_modes_it_cannot_rank():
    check = timing.rank_check(["ar", "a", "b", "c"], [[1, 1], [0.50, 0.70], [0.60, 0.80], [1.50, 1.60]])
    assert check["flagged"] and check["undetermined"] == [1, 2]


def test_rank_check_needs_two_repeats_and_sane_input():
    check = timing.rank_check(["ar", "a"], [[1.0], [0.5]])
    assert not check["checked"] and not check["flagged"]
    assert timing.rank_check(["ar", "a"], [[1.0, 1.0], [0.5, None]])["checked"] is False
    with pytest.raises(ValueError):
        timing.rank_check(["ar"], [[1.0], [1.0]])
    with pytest.raises(ValueError):
        timing.rank_check(["ar"], [[1.0]], tie=-0.1)
    # A wider tie tolerance turns a close pair into a tie.
    assert timing.rank_check(["a", "b"], [[0.8, 0.9], [0.85, 0.95]])["flagged"]
    assert not timing.rank_check(["a", "b"], [[0.8, 0.9], [0.85, 0.95]], tie=0.2)["flagged"]


ROWS = [{"name": f"mode number {i}", "a": 1234.5 * i, "b": "x" * 35, "c": "y" * 35, "d": "z" * 35} for i in range(3)]
COLS = [("name", "name"), ("a", "a value"), ("b", "bee"), ("c", "cee"), ("d", "dee")]


def test_fit_columns_drops_optional_columns_until_the_table_fits():
    full = report.terminal_table(ROWS, COLS)
    assert max(map(len, full.splitlines())) > 120
    kept, dropped = report.fit_columns(ROWS, COLS, 120, optional=("c", "b"))
    assert dropped == ["cee"] and [k for k, _ in kept] == ["name", "a", "b", "d"]
    text = report.terminal_table(ROWS, COLS, max_width=120, optional=("c", "b"))
    assert max(map(len, text.splitlines())) <= 120 and "cee" not in text
    assert max(map(len, report.terminal_table(ROWS, COLS, 40, optional=("c", "b")).splitlines())) > 40  # d kept
    assert report.fit_columns(ROWS, COLS, None, ("c",)) == (COLS, [])
    assert report.table_width(report.table(ROWS, COLS)) == max(map(len, full.splitlines()))


def test_wrap_notes_width():
    text = report.wrap_notes(["word " * 100, "short"], width=50)
    lines = text.splitlines()
    assert all(len(line) <= 50 for line in lines) and lines[0].startswith("- ") and lines[1].startswith("  ")
    assert lines[-1] == "- short"
