"""The paper-table check: leave-one-out on Table A.2, regret read from Table A.1."""

from __future__ import annotations

import math

import pytest

from analysis.paper_check import TABLE_A1, TABLE_A2, accuracy_at, paper_check


def test_table_a1_is_read_exactly_at_its_betas_and_linearly_in_log_beta_between():
    assert accuracy_at("ResNet56", 2.0) == pytest.approx(76.32)
    between = accuracy_at("WRN-40-2", math.sqrt(4.0 * 6.0))  # halfway in log beta
    assert between == pytest.approx((76.17 + 76.70) / 2)
    assert accuracy_at("ResNet32x4", 50.0) == pytest.approx(76.32)  # clamped to the measured range


def test_each_prediction_leaves_its_teacher_out():
    table = paper_check().set_index("teacher")
    assert list(table.index) == list(TABLE_A1)
    others = [beta for name, (_, beta) in TABLE_A2.items() if name != "ResNet56"]
    assert table.loc["ResNet56", "constant"] == pytest.approx(math.exp(sum(map(math.log, others)) / 5))
    # ResNet56's gap is below every other teacher's: the fit is read at the nearest calibrated gap.
    assert table.loc["ResNet56", "auto-beta (held out)"] > 2.0
    for teacher, row in table.iterrows():
        assert row["best top-1"] == max(TABLE_A1[teacher])
        assert row["auto-beta regret"] == pytest.approx(
            row["best top-1"] - accuracy_at(teacher, row["auto-beta (held out)"])
        )
        assert row["auto-beta regret"] >= 0 and row["constant regret"] >= 0
