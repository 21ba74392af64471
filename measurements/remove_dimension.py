"""A dimension is its module alone: copy the repository without one (its module, its registry lines, the ds_configs
that turn it on), then, in the copy, plan every pinned layout that does not use it and compare each with the
committed snapshot (measurements/planner_snapshot.json), and dry-run the default job. Restoring it is the copy
not made.

    python measurements/remove_dimension.py --dimension pp     # or sp (TP and EP make up the tp_ep strategy)
    python measurements/remove_dimension.py --dimension pp sp --out docs/results/remove_dimension_cpu.md

A layout the copy refuses is left out of the comparison: a refusal's text names every dimension the layout has
(dp(?)*tp(2)*ep(1)*pp(1)*sp(1)), so it changes with the dimensions there are.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = {"pp": "pipeline", "sp": "ulysses"}  # the dimensions no other strategy is made of
SECTIONS = {"pp": "pipeline", "sp": "sequence_parallel_size"}  # the ds_config key that turns each on

CHECK = r"""
import json, sys
sys.path.insert(0, "measurements")
import planner_snapshot as p
pinned = json.load(open(sys.argv[1]))
same = differ = refused = 0
for key, args, world, gpu in p.combinations():
    out = p.plan_output(args, world, gpu)
    if "refused" in out:
        refused += 1
    elif p.digest(out) == pinned[key]:
        same += 1
    else:
        differ += 1
        print("differs:", key)
print(json.dumps({"identical": same, "differ": differ, "refused": refused}))
"""


def without(dimension: str, dest: str) -> list[str]:
    """The tracked files copied to dest, less the dimension's module, registry lines and ds_configs -> what was
    removed."""
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    module = MODULES[dimension]
    removed = [f"bench/strategies/{module}.py"]
    for f in files:
        if f.startswith("ds_configs/") and SECTIONS[dimension] in json.load(open(os.path.join(REPO, f))):
            removed.append(f)
    for f in files:
        if f in removed or not os.path.isfile(os.path.join(REPO, f)):
            continue
        os.makedirs(os.path.dirname(os.path.join(dest, f)) or dest, exist_ok=True)
        shutil.copy2(os.path.join(REPO, f), os.path.join(dest, f))
    registry = os.path.join(dest, "bench/strategies/__init__.py")
    text = open(registry).read()
    imported = re.search(rf"^from bench\.strategies\.{module} import (.+)$", text, re.M)
    names = [n.strip() for n in imported.group(1).split(",")]
    text = text.replace(imported.group(0) + "\n", "")
    for name in names:
        text = re.sub(rf"^\s+{name},\n", "", text, flags=re.M)
    open(registry, "w").write(text)
    return removed + [f"bench/strategies/__init__.py: {', '.join(names)}"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dimension", choices=sorted(MODULES), nargs="+", default=["pp"])
    ap.add_argument("--out", help="also write the results as a page")
    a = ap.parse_args()
    rows = [one(d) for d in a.dimension]
    if a.out:
        with open(a.out, "w") as fh:
            from importlib.metadata import version
            fh.write(PAGE.format(command=" ".join(["python measurements/remove_dimension.py", *sys.argv[1:]]),
                                 rows="\n".join(rows), host=os.uname().nodename, cpus=os.cpu_count(),
                                 versions=", ".join(f"{p} {version(p)}" for p in ("torch", "deepspeed",
                                                                                  "transformers"))))
    return 0 if all(r.endswith("| yes |") for r in rows) else 1


PAGE = """# The planner without one dimension's module (CPU)

`{command}` (on {host}, {cpus} CPUs; {versions}; planning only, no GPU involved)

Each row: the repository copied without the dimension's module (bench/strategies/), its registry lines and the
ds_configs that turn it on; in the copy, every layout of measurements/planner_snapshot.py that it still plans is
compared with the committed snapshot, and the default job's dry run is run. Layouts the copy refuses are left out
(a refusal names every dimension there is).

| dimension | removed | planned layouts identical | differ | refused (left out) | default dry run | pass |
|---|---|---|---|---|---|---|
{rows}
"""


def one(dimension: str) -> str:
    """Remove one dimension, check the copy -> its page row."""
    with tempfile.TemporaryDirectory() as copy:
        removed = without(dimension, copy)
        print(f"removed: {'; '.join(removed)}")
        env = {**os.environ, "PYTHONPATH": copy}
        plan = subprocess.run([sys.executable, "-c", CHECK, os.path.join(REPO, "measurements/planner_snapshot.json")],
                              cwd=copy, env=env, capture_output=True, text=True)
        dry = subprocess.run([sys.executable, "bench/run.py", "--dry_run", "--wandb_mode", "disabled"], cwd=copy,
                             env=env, capture_output=True, text=True)
    if plan.returncode != 0:
        print(plan.stdout[-2000:] + plan.stderr[-3000:])
        return f"| {dimension} | {'; '.join(removed)} | - | - | - | - | no |"
    counts = json.loads(plan.stdout.strip().splitlines()[-1])
    print(f"without {dimension}: {counts['identical']} planned layouts identical to the snapshot, "
          f"{counts['differ']} differ, {counts['refused']} refused (left out); default dry run exit {dry.returncode}")
    ok = counts["differ"] == 0 and counts["identical"] > 0 and dry.returncode == 0
    return (f"| {dimension} | {'; '.join(removed)} | {counts['identical']} | {counts['differ']} | {counts['refused']} "
            f"| exit {dry.returncode} | {'yes' if ok else 'no'} |")


if __name__ == "__main__":
    raise SystemExit(main())
