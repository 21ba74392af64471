"""The planner's and cost model's output is pinned (measurements/planner_snapshot.py): a sample of its layouts must
hash as committed. A deliberate change of a formula rewrites the snapshot (`--write`) in the same commit."""
import json
import sys

import pytest

from support import REPO

sys.path.insert(0, str(REPO / "measurements"))
import planner_snapshot  # noqa: E402 - measurements/planner_snapshot.py

pytestmark = pytest.mark.unit


def test_a_sample_of_the_pinned_layouts_plans_as_committed():
    pinned = json.loads((REPO / "measurements" / "planner_snapshot.json").read_text())
    combos = planner_snapshot.combinations()
    assert len(combos) + 4 == len(pinned)  # the script's set is the committed one
    sample = combos[::37]  # every model, peft, batching, world size, tiling and the CPU among 19 layouts
    differ = [key for key, args, world, gpu in sample
              if planner_snapshot.digest(planner_snapshot.plan_output(args, world, gpu)) != pinned[key]]
    assert not differ, f"planner output changed for {differ}: if deliberate, rerun measurements/planner_snapshot.py --write"


def test_the_digest_sees_a_change_in_any_number():
    out = {"estimate": {"per_rank": [{"total_bytes": 10}]}, "strategy": "dp"}
    changed = {"estimate": {"per_rank": [{"total_bytes": 11}]}, "strategy": "dp"}
    assert planner_snapshot.digest(out) != planner_snapshot.digest(changed)
    assert planner_snapshot.digest(out) == planner_snapshot.digest(json.loads(json.dumps(out)))
