"""Budgets: '90s', '30m', '1h' parsed in one place; deadlines; the process's start time."""

from __future__ import annotations

import time

import pytest

from dogtl.core.budget import Deadline, format_seconds, parse_budget, process_start
from dogtl.core.errors import DogtlError


@pytest.mark.parametrize("text, seconds", [("90", 90), ("90s", 90), ("30m", 1800), ("1h", 3600), ("1.5h", 5400),
                                           ("1h30m", 5400), (" 2 m ", 120), ("45sec", 45), (120, 120), (0.5, 0.5)])
def test_budgets_parse_to_seconds(text, seconds):
    assert parse_budget(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "30x", "m", "-5m", "0", "1h-2m", "nan", True])
def test_bad_budgets_are_one_line_errors(text):
    with pytest.raises(DogtlError, match="--budget"):
        parse_budget(text)


def test_format_seconds_reads_back():
    for seconds in (42, 90, 120, 5400, 3600 + 61):
        assert parse_budget(format_seconds(seconds)) == seconds
    assert [format_seconds(s) for s in (0, 42.3, 62, 120, 3600 + 61, 5400)] == \
        ["0s", "42s", "1m02s", "2m", "1h01m01s", "1h30m"]


def test_deadline_counts_from_the_given_start():
    d = Deadline.after(10, started=time.time() - 4)
    assert 5.5 < d.left() <= 6 and not d.passed() and d.passed(7)
    half = d.share(0.5)
    assert 2.5 < half.left() <= 3
    assert Deadline.after(1, started=time.time() - 2).passed()


def test_process_start_is_before_now_and_not_before_the_import():
    started = process_start()
    assert started <= time.time()
    import dogtl.core.budget as budget

    assert started >= budget._IMPORTED - 60
