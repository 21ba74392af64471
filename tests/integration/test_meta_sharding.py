"""The planner's per-rank parameter shards equal what DeepSpeed's AutoTP and AutoEP really build for LLaMA 3.1 8B
and Mixtral 8x7B at their real size: each layout's last rank, sharded on the meta device under a fake process group
of the layout's size (tests/support/meta_sharding.py)."""
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.multiproc

LLAMA, MIXTRAL = ("--model", "llama3.1-8b"), ("--model", "mixtral-8x7b")
LAYOUTS = [  # (world, flags)
    (2, (*LLAMA, "--strategy", "tp", "--ds_config", "ds_configs/tp2.json", "--peft", "none")),
    (4, (*LLAMA, "--strategy", "tp", "--ds_config", "ds_configs/tp4.json", "--peft", "lora")),
    (8, (*LLAMA, "--strategy", "tp", "--ds_config", "ds_configs/tp8.json", "--peft", "none")),
    (8, (*LLAMA, "--strategy", "tp", "--ds_config", "ds_configs/tp8.json", "--peft", "lora")),
    (2, (*MIXTRAL, "--strategy", "tp", "--ds_config", "ds_configs/tp2.json", "--peft", "lora")),
    (2, (*MIXTRAL, "--strategy", "ep", "--ds_config", "ds_configs/ep2.json", "--peft", "none")),
    (4, (*MIXTRAL, "--strategy", "ep", "--ds_config", "ds_configs/ep4.json", "--peft", "lora")),
    (8, (*MIXTRAL, "--strategy", "ep", "--ds_config", "ds_configs/ep8.json", "--peft", "lora")),
    (4, (*MIXTRAL, "--strategy", "tp_ep", "--ds_config", "ds_configs/tp2_ep2.json", "--peft", "lora")),
    (8, (*MIXTRAL, "--strategy", "tp_ep", "--ds_config", "ds_configs/tp4_ep2.json", "--peft", "none")),
]


@pytest.mark.parametrize("world,flags", LAYOUTS, ids=[f"{f[1]}-{f[5]}-{f[7]}" for _, f in LAYOUTS])
def test_planned_shards_equal_deepspeeds_at_full_size(world, flags):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    res = subprocess.run([sys.executable, "tests/support/meta_sharding.py", str(world), str(world - 1), *flags],
                         capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["meta"], "a weight was allocated"
    assert got["held"] == got["planned_held"] < got["whole_model"], got
    assert got["trainable"] == got["planned_trainable"], got
