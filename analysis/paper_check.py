"""Auto-beta checked on the paper's own numbers: leave one teacher out of Table A.2, read the regret from Table A.1.

Table A.2 gives six CIFAR-100 teachers' gaps and the betas the authors used; Table A.1 gives, for
three of them (ShuffleNet-V1 student), the top-1 at betas 1, 2, 4, 6, 8 and 10. For each of those
three: fit auto-beta (log beta linear in the gap, slope >= 0: `dkd_tune.teacher.auto_beta.fit_calibration`)
on the OTHER five teachers of Table A.2, predict its beta, and read the top-1 there from Table A.1
(linear in log beta between the measured betas; clamped to the measured range). The constant
baseline predicts the geometric mean of the other five betas. Regret = the row's best top-1 minus
the top-1 at the prediction.

    python -m analysis.paper_check
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from dkd_tune.teacher.auto_beta import CalibrationPoint, fit_calibration

# Table A.2: teacher -> (mean logit gap z_t - z_max over the training set, beta used).
TABLE_A2 = {
    "ResNet56": (5.36, 2.0),
    "ResNet110": (6.73, 2.0),
    "WRN-40-2": (7.24, 6.0),
    "VGG13": (8.25, 6.0),
    "ResNet50": (8.53, 8.0),
    "ResNet32x4": (8.40, 8.0),
}
# Table A.1: ShuffleNet-V1 student's top-1 (%) at each beta, per teacher.
TABLE_A1_BETAS = (1.0, 2.0, 4.0, 6.0, 8.0, 10.0)
TABLE_A1 = {
    "ResNet56": (76.02, 76.32, 75.91, 75.62, 75.33, 75.35),
    "WRN-40-2": (75.94, 76.25, 76.17, 76.70, 76.44, 76.21),
    "ResNet32x4": (74.95, 75.64, 75.82, 76.34, 76.45, 76.32),
}


def accuracy_at(teacher: str, beta: float) -> float:
    """Table A.1's top-1 at `beta`, linear in log beta between measured betas (clamped to 1..10)."""
    x = np.log(TABLE_A1_BETAS)
    return float(np.interp(math.log(beta), x, TABLE_A1[teacher]))


def paper_check() -> pd.DataFrame:
    """One row per Table A.1 teacher: held-out predictions of auto-beta and the constant, and their regrets."""
    rows = []
    for teacher in TABLE_A1:
        others = [
            CalibrationPoint(name, gap, beta, "Table A.2")
            for name, (gap, beta) in TABLE_A2.items()
            if name != teacher
        ]
        calibration = fit_calibration(others, "cifar", "Table A.2 without " + teacher)
        gap = TABLE_A2[teacher][0]
        autobeta = calibration.predict(gap).beta
        constant = math.exp(sum(math.log(point.best_beta) for point in others) / len(others))
        best = max(TABLE_A1[teacher])
        rows.append(
            {
                "teacher": teacher,
                "gap": gap,
                "best beta (Table A.1)": TABLE_A1_BETAS[int(np.argmax(TABLE_A1[teacher]))],
                "best top-1": best,
                "auto-beta (held out)": autobeta,
                "auto-beta regret": best - accuracy_at(teacher, autobeta),
                "constant": constant,
                "constant regret": best - accuracy_at(teacher, constant),
            }
        )
    return pd.DataFrame(rows)


def main() -> None:
    from analysis.tables import markdown_table

    table = paper_check()
    print(markdown_table(table))
    print()
    print(
        f"mean regret: auto-beta {table['auto-beta regret'].mean():.2f} points, "
        f"constant {table['constant regret'].mean():.2f} points ({len(table)} teachers)"
    )


if __name__ == "__main__":
    main()
