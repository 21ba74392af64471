"""measurements/gpu_check.py's result line: it names what ran and what was skipped, with why, and never says every
check passed over a skipped one (one GPU cannot check layout parity)."""
import sys

import pytest

from support import REPO

pytestmark = pytest.mark.unit
sys.path.insert(0, str(REPO / "measurements"))


def test_the_result_names_what_was_skipped_and_never_claims_every_check(tmp_path):
    import gpu_check
    c = gpu_check.Check(str(tmp_path))
    c.ran = ["default", "shape-1b"]
    c.skip("6. layout parity (TP2, EP2, PP2, SP2)", "1 device: a layout needs 2 or more")
    text = "\n".join(c.result())
    assert "2 launches ran (default, shape-1b): passed" in text
    assert "SKIPPED 6. layout parity (TP2, EP2, PP2, SP2): 1 device: a layout needs 2 or more" in text
    assert "Every check passed" not in text and "1 skipped" in text
    c.skipped = []
    assert "Every check that ran passed; none was skipped." in c.result()[-1]
    c.failed = ["offload: failed"]
    assert "FAILED" in "\n".join(c.result()) and "Every check that ran passed" not in "\n".join(c.result())
