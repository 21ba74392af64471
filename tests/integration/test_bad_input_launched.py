"""Bad input on real launches: every rank of a multi-rank launch says the one line and exits promptly, with no
run directory left behind (the same cases in-process: tests/unit/test_bad_input.py)."""
import time

import pytest

from support import run_bench
from support.bad_input import CASES, args_of


LAUNCHED = ["missing-ds-config", "batch-arithmetic", "layout-mismatch"]  # 1, 2 and 2 ranks


@pytest.mark.multiproc
@pytest.mark.parametrize("case", [c for c in CASES if c[0] in LAUNCHED], ids=LAUNCHED)
def test_every_rank_of_a_real_launch_refuses_and_exits(tmp_path, bad_files, case):
    _, _, ranks, expected = case
    out = tmp_path / "runs"
    t0 = time.time()
    res = run_bench(out, *args_of(case, bad_files), nprocs=ranks, launcher="deepspeed" if ranks > 1 else "python",
                    timeout=180)
    assert res.returncode != 0
    assert time.time() - t0 < 120, "every rank must exit promptly"
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert errors and all(line == errors[0] for line in errors), res.output[-3000:]
    assert len(errors) == ranks, f"each rank says it once: {errors}"
    assert expected in errors[0], errors[0]
    assert "Traceback" not in res.output
    assert not out.exists() or not any(out.iterdir()), "no run directory for a run that never started"
