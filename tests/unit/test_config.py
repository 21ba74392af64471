"""Config resolution: CLI > ds_config > defaults, "auto" fields, batch arithmetic, layout factors."""
import json
import re
from pathlib import Path

import pytest

from bench.config import BenchError, parse_args
from bench.ds_config import resolve_batch, resolve_ds_config
from bench.strategies import Layout, layout_of, strategy_of

pytestmark = pytest.mark.unit


def test_batch_defaults_and_precedence():
    cfg = parse_args([])
    assert vars(resolve_batch(cfg, {}, dp=2)) == {"micro": 2, "grad_accum": 1, "global_": 4}
    ds = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2, "train_batch_size": "auto"}
    assert vars(resolve_batch(cfg, ds, dp=2)) == {"micro": 4, "grad_accum": 2, "global_": 16}
    cli = parse_args(["--micro_batch_size", "1", "--global_batch_size", "8"])
    assert vars(resolve_batch(cli, ds, dp=2)) == {"micro": 1, "grad_accum": 4, "global_": 8}


def test_batch_arithmetic_refused():
    with pytest.raises(BenchError, match="not divisible"):
        resolve_batch(parse_args(["--global_batch_size", "10", "--micro_batch_size", "4"]), {}, dp=1)
    with pytest.raises(BenchError, match="positive integer"):
        resolve_batch(parse_args([]), {"train_micro_batch_size_per_gpu": 0}, dp=1)


def test_auto_fields_resolved_and_cli_overrides():
    cfg = parse_args(["--lr", "0.01"])
    batch = resolve_batch(cfg, {}, dp=1)
    ds = {"bf16": {"enabled": "auto"}, "optimizer": {"type": "AdamW", "params": {"lr": 0.5, "torch_adam": "auto"}},
          "wandb": {"enabled": True}}
    cpu = resolve_ds_config(cfg, ds, batch, "cpu", bf16_ok=False)
    fused = {"torch_adam": True, "fused": True}  # torch's fused AdamW on both devices: nothing is compiled
    assert cpu["bf16"]["enabled"] is False and cpu["optimizer"]["params"] == {"lr": 0.01, **fused}
    assert cpu["wandb"]["enabled"] is False  # DeepSpeed's own monitor stays off
    gpu = resolve_ds_config(parse_args([]), ds, batch, "cuda", bf16_ok=True)
    assert gpu["bf16"]["enabled"] is True and gpu["optimizer"]["params"] == {"lr": 0.5, **fused}
    offload = {**ds, "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    assert resolve_ds_config(cfg, offload, batch, "cuda", True)["optimizer"]["params"] == {
        "lr": 0.01, "torch_adam": False}, "ZeRO offload: DeepSpeed's CPU Adam, unfused"
    assert ds["bf16"]["enabled"] == "auto", "the input dict is not modified"
    with pytest.raises(BenchError, match="zero_optimization.stage"):
        resolve_ds_config(cfg, {"zero_optimization": {"stage": "auto"}}, batch, "cpu", False)


@pytest.mark.parametrize("precision,device,bf16_ok,given,expected", [
    ("auto", "cpu", False, {"bf16": {"enabled": "auto"}}, "fp32"),   # the CPU keeps fp32 unless asked
    ("auto", "cuda", True, {"bf16": {"enabled": "auto"}}, "bf16"),   # a GPU with bf16
    ("auto", "cuda", True, {"bf16": {"enabled": False}}, "fp32"),    # an explicit ds_config value is kept
    ("bf16", "cpu", False, {}, "bf16"),                              # asked: bf16 on the CPU, section created
    ("fp32", "cuda", True, {"bf16": {"enabled": True}}, "fp32"),     # the command line wins
    ("bf16", "cuda", True, {"fp16": {"enabled": True}}, "bf16"),     # one half precision at a time
])
def test_precision_flag_over_the_ds_config(precision, device, bf16_ok, given, expected):
    from bench.ds_config import precision_of
    cfg = parse_args(["--precision", precision])
    ds = resolve_ds_config(cfg, given, resolve_batch(cfg, {}, dp=1), device, bf16_ok)
    assert precision_of(ds) == expected


def test_bf16_on_a_gpu_without_it_is_refused_in_one_line():
    cfg = parse_args(["--precision", "bf16"])
    with pytest.raises(BenchError, match="no bf16 support; use --precision fp32"):
        resolve_ds_config(cfg, {}, resolve_batch(cfg, {}, dp=1), "cuda", bf16_ok=False)


def test_layout_factors():
    assert layout_of({}, 8) == Layout(dp=8)
    import copy
    import pickle
    tp2 = Layout(dp=2, tp=2)
    assert copy.deepcopy(tp2) == pickle.loads(pickle.dumps(tp2)) == tp2 and hash(copy.copy(tp2)) == hash(tp2)
    ep = {"enabled": True, "autoep_size": 2}
    lay = layout_of({"tensor_parallel": {"autotp_size": 2}, "expert_parallel": ep}, 8)
    assert (lay.dp, lay.tp, lay.ep, lay.pp) == (2, 2, 2, 1) and lay.world_size == 8
    assert lay.data_parallel == 4 and [lay.coords(r).data for r in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]
    # DeepSpeed ignores an expert_parallel section that is not enabled
    assert layout_of({"expert_parallel": {"autoep_size": 2}}, 8) == Layout(dp=8)
    pipe = layout_of({"pipeline": {"stages": 2}}, 4)  # stages are the outer rank axis
    assert (pipe.dp, pipe.pp) == (2, 2) and [pipe.coords(r).data for r in range(4)] == [0, 1, 0, 1]
    assert lay.describe() == "dp(2)*tp(2)*ep(2)*pp(1)*sp(1) = 8"
    with pytest.raises(BenchError, match=r"dp\(\?\)\*tp\(4\)\*ep\(1\)\*pp\(1\)\*sp\(1\) != WORLD_SIZE\(6\)"):
        layout_of({"tensor_parallel": {"autotp_size": 4}}, 6)
    # sequence parallelism: consecutive ranks share the data, ZeRO spans them all
    seq = layout_of({"sequence_parallel_size": 2}, 8)
    assert (seq.dp, seq.sp, seq.data_parallel, seq.zero_degree) == (4, 2, 4, 8)
    assert [seq.coords(r).data for r in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]
    # AutoEP folded over the SP ranks adds none, and its degree must divide the world it folds over
    folded = layout_of({"sequence_parallel_size": 2, "expert_parallel": {"enabled": True, "autoep_size": 2}}, 4)
    assert (folded.dp, folded.data_parallel, folded.world_size) == (2, 2, 4)
    assert folded.describe() == "dp(2)*tp(1)*pp(1)*sp(2) = 4 (ep(2) folded over them)"
    with pytest.raises(BenchError, match=r"expert_parallel.autoep_size 3 must divide WORLD_SIZE \(4\): under "
                                         r"sequence_parallel_size 2 its groups fold"):
        layout_of({"sequence_parallel_size": 2, "expert_parallel": {"enabled": True, "autoep_size": 3}}, 4)


def test_slurm_environment_maps_to_ranks(monkeypatch, launch_env):
    from bench import distributed
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("MASTER_ADDR", "node001")
    env = distributed.discover()
    assert (env.rank, env.local_rank, env.world_size) == (5, 1, 8)
    monkeypatch.delenv("MASTER_ADDR")
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k)
    with pytest.raises(BenchError, match="MASTER_ADDR"):
        distributed.discover()


def test_readme_flag_table_is_generated_from_the_configuration():
    """The README's flag table is bench.config's readme_table(): every flag, in its section, with its help."""
    from bench import config
    assert config.main(["--check"]) == 0, "run python -m bench.config --readme"
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert all(f"| `--{flag}` |" in readme for flag in config.FLAGS)
    assert all(f"**{section}**" in readme for section in config.SECTIONS)


def test_configuration_is_nested_frozen_and_records_its_sections():
    """One flag, one section field; the record is by section; runs recorded flat (before sections) read the same;
    a change makes a new configuration."""
    import dataclasses
    from bench.config import FLAGS, SECTIONS, RunConfig, recorded_flags
    cfg = parse_args(["--model", "tiny-mixtral", "--seq_len", "64", "--save_interval", "3", "--lr", "0.01"])
    assert (cfg.model.name, cfg.data.seq_len, cfg.checkpoint.save_interval, cfg.optimizer.lr) == \
        ("tiny-mixtral", 64, 3, 0.01)
    assert len(FLAGS) == sum(len(dataclasses.fields(c)) for c in SECTIONS.values())  # no flag in two sections
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.data.seq_len = 128
    record = json.loads(json.dumps(cfg.to_dict()))
    assert set(record) == set(SECTIONS) and record["data"]["seq_len"] == 64
    flat = recorded_flags(record)
    assert flat == cfg.flags() and recorded_flags(flat) == flat  # the older, flat record reads the same
    assert RunConfig.from_flags(flat) == cfg
    longer = cfg.with_flags(seq_len=128)
    assert (longer.data.seq_len, cfg.data.seq_len, longer.model) == (128, 64, cfg.model)
    with pytest.raises(BenchError, match="unknown setting"):
        RunConfig.from_flags({"seq_length": 1})


def test_coords_are_deepspeeds_own_rank_topology():
    """Layout.coords against DeepSpeed's topology objects: the pipeline's (stage, data) grid, and the expert
    groups (consecutive ranks, so expert-data-parallel partners sit ep apart)."""
    from deepspeed.runtime.pipe.topology import PipeDataParallelTopology, ProcessTopology
    pipe = layout_of({"pipeline": {"stages": 4}}, 8)
    topo = PipeDataParallelTopology(num_pp=4, num_dp=2)
    for rank in range(8):
        at, theirs = pipe.coords(rank), topo.get_coord(rank)
        assert (at["pp"], at.data, at.zero) == (theirs.pipe, theirs.data, theirs.data)
    assert [pipe.ranks_at("pp", s) for s in range(4)] == [topo.filter_match(pipe=s) for s in range(4)]
    tp = layout_of({"tensor_parallel": {"autotp_size": 4}}, 8)
    mesh = ProcessTopology(axes=["data", "model"], dims=[2, 4])  # DeepSpeed's (data, tensor) mesh
    for rank in range(8):
        assert (tp.coords(rank).data, tp.coords(rank)["tp"]) == tuple(mesh.get_coord(rank))
    ep = layout_of({"expert_parallel": {"enabled": True, "autoep_size": 2}}, 8)
    experts = ProcessTopology(axes=["expert_data", "expert"], dims=[4, 2])
    for rank in range(8):
        assert ep.coords(rank)["ep"] == experts.get_coord(rank).expert_data
        assert ep.coords(rank).zero == ep.coords(rank).data == rank  # every rank its own stream for dense weights


def test_the_strategy_is_the_layouts_and_a_given_one_that_disagrees_is_refused():
    """strategy_of names every shipped ds_config's layout; --strategy may be left out (it is derived), and a
    given one passes its strategy's checks only where it is that name (each other name refuses in one line)."""
    import glob
    from bench import models
    from bench.strategies import STRATEGIES
    own = 0  # ds_configs whose own strategy passes; the tiny models' 4 heads, 2 key/value heads and 4 experts
    # cannot split 8 or 4 ways in five of them (tp4, tp8, tp4_ep2, sp8, ep8)
    for path in sorted(glob.glob("ds_configs/*.json")):
        ds = json.loads(Path(path).read_text())
        layout, engine = layout_of(ds, 8), ds.get("engine", "deepspeed")
        assert strategy_of(layout, engine) in STRATEGIES, path
        model = "tiny-mixtral" if layout.ep > 1 else "tiny-llama"
        model_config = models.load_config(model, "random", offline=True)[0]
        passed = []
        for name, cls in STRATEGIES.items():
            cfg = parse_args(["--strategy", name, "--ds_config", path, "--model", model])
            try:
                cls().check(cfg, ds, layout, model_config)
            except BenchError as e:
                assert "\n" not in str(e), (path, name)
                continue
            passed.append(name)
        assert passed in ([], [strategy_of(layout, engine)]), (path, passed)
        own += passed == [strategy_of(layout, engine)]
    assert own == len(glob.glob("ds_configs/*.json")) - 5


def test_each_dimension_reads_its_own_degree_and_owns_its_section():
    """The dimensions' declarations (bench/strategies: Dimension) are what the layout reads: a degree where its
    module says, a bad one refused with the place it was read, and a section only strategies made of it accept."""
    from bench.strategies import DIMENSIONS, STRATEGIES
    assert list(DIMENSIONS) == ["tp", "ep", "pp", "sp"]
    for key, ds in [("tp", {"tensor_parallel": {"autotp_size": 2}}), ("pp", {"pipeline": {"stages": 2}}),
                    ("sp", {"sequence_parallel_size": 2}), ("ep", {"expert_parallel": {"enabled": True,
                                                                                      "autoep_size": 2}})]:
        d = DIMENSIONS[key]
        assert d.section in ds and d.degree(ds) == 2 and getattr(layout_of(ds, 4), key) == 2
        with pytest.raises(BenchError, match=f"ds_config {re.escape(d.degree_key)} must be a positive integer"):
            layout_of(json.loads(json.dumps(ds).replace("2", "0")), 4)
        made_of = sorted(name for name, cls in STRATEGIES.items() if key in cls.dimensions)
        assert made_of == {"tp": ["tp", "tp_ep"], "ep": ["ep", "sp", "tp_ep"], "pp": ["hybrid", "pp"],
                           "sp": ["sp"]}[key]
        for name in set(STRATEGIES) - set(made_of):
            with pytest.raises(BenchError, match=f"got a ds_config with a '{d.section}' section; that layout belongs "
                                                 f"to a {key} strategy"):
                STRATEGIES[name]().reject_foreign_sections(ds)


def test_a_run_without_strategy_takes_the_ds_configs(refuse):
    from bench.plan import plan_layout
    plan = plan_layout(["--ds_config", "ds_configs/tp2.json", "--peft", "auto"], 2)
    assert plan.cfg.parallelism.strategy == "tp" and plan.peft == "none"  # the tp strategy's default, recorded resolved
    assert plan_layout(["--ds_config", "ds_configs/pp2_dp2.json"], 4).cfg.parallelism.strategy == "hybrid"
    code, errors = refuse("--strategy", "nope")
    assert code == 2 and errors == ["error: unknown strategy 'nope'; choose one of dp, tp, ep, tp_ep, pp, hybrid, sp, "
                                    "ddp, fsdp2 (or leave --strategy out: the ds_config's layout says it)"]


def test_a_dimension_declared_in_its_own_module_is_composed_by_the_layout_unchanged():
    """Layout names no dimension: one declared elsewhere (here a context-parallel one, ranks inside the data axis
    and outside TP's, ZeRO sharding over them) gets its place in world_size, the data streams, ZeRO's group, the
    coordinates, the description and the recorded layout, with nothing else changed."""
    from bench.layout import DIMENSIONS, Dimension, register
    cp = Dimension("cp", "context_parallel", "context_parallel.size", degree=lambda ds: ds.get("context_parallel", 1),
                   comm_bytes=lambda plan, rank, w: {}, comm_calls=lambda plan, rank: {}, span=lambda lay: lay.cp,
                   gather_group=lambda lay: lay.cp, order=15, zero_shards=True, splits_sequence=True)
    register(cp)
    try:
        lay = layout_of({"tensor_parallel": {"autotp_size": 2}, "context_parallel": 2}, 16)
        assert (lay.dp, lay.tp, lay.cp, lay.world_size, lay.data_parallel, lay.zero_degree) == (4, 2, 2, 16, 4, 8)
        assert lay.sequence_split == 2 and lay.as_dict()["cp"] == 2
        # rank = (data * cp + cp place) * tp + tp place: an independent mixed radix
        for rank in range(16):
            at = lay.coords(rank)
            assert (at.data, at["cp"], at["tp"]) == (rank // 4, rank // 2 % 2, rank % 2)
            assert at.zero == rank // 2  # ZeRO runs over the data and cp axes, not TP's
        assert lay.describe() == "dp(4)*tp(2)*ep(1)*pp(1)*sp(1)*cp(2) = 16"
        with pytest.raises(BenchError, match=r"no strategy runs cp and tp together"):
            strategy_of(lay)
    finally:
        del DIMENSIONS["cp"]


# Each dimension's module(s), and the combined strategies that are made of it beside their own
OWNERS = {"tp": ("autotp.py", "tp_lora.py", "autoep.py"), "ep": ("autoep.py", "ulysses.py"), "pp": ("pipeline.py",),
          "sp": ("ulysses.py",)}
MODULES = {"tp": "autotp", "ep": "autoep", "pp": "pipeline", "sp": "ulysses"}


def _uses_outside(key: str) -> dict:
    """Per module of the package: its reads of the dimension's degree (`.tp`), its name as a string (docstrings
    aside) and imports from its module; the SP flags count as SP's."""
    import ast
    from collections import Counter
    package = Path(__file__).resolve().parents[2] / "bench"
    attrs = {key, *(("tiled_mlp", "tiled_loss") if key == "sp" else ())}
    found = Counter()
    for path in sorted(package.rglob("*.py")):
        if path.name in OWNERS[key]:
            continue
        tree = ast.parse(path.read_text())
        docs = {id(n.body[0].value) for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef))
                and n.body and isinstance(n.body[0], ast.Expr)}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr in attrs
                    or isinstance(node, ast.Constant) and node.value == key and id(node) not in docs
                    or isinstance(node, ast.ImportFrom) and ((node.module or "").endswith(MODULES[key])
                                                             or any(a.name == MODULES[key] for a in node.names))):
                found[str(path.relative_to(package))] += 1
    return dict(found)


@pytest.mark.parametrize("key", sorted(OWNERS))
def test_every_dimension_lives_in_its_own_module(key):
    """No module of the package but the dimension's own (and the combined strategies made of it) reads its degree,
    names it or imports from it, except the registry's one line: the layout, the planner, the cost model, loading
    and the records read what it declares (bench/layout.py Dimension)."""
    assert _uses_outside(key) == {"strategies/__init__.py": 1}


def test_the_run_spec_is_built_without_a_model_or_data():
    """RunSpec (bench/spec.py) from the ds_config and the flags alone: a model and a data set that do not exist
    are never read; the strategy is the layout's label, peft its default, and a variant keeps the global batch."""
    from bench.spec import spec_of
    cfg = parse_args(["--ds_config", "ds_configs/tp2.json", "--model", "/nonexistent/model", "--data",
                      "/nonexistent/data.jsonl", "--global_batch_size", "8", "--micro_batch_size", "2",
                      "--seq_len", "512"])
    spec = spec_of(cfg, 4, lambda: ("cuda", True))
    assert (spec.strategy, spec.peft, spec.layout) == ("tp", "none", Layout(dp=2, tp=2))
    assert (spec.batch.micro, spec.batch.grad_accum, spec.batch.global_) == (2, 2, 8)
    assert (spec.zero_stage, spec.offload, spec.precision, spec.seq_len) == (1, [], "bf16", 512)
    assert spec_of(cfg, 4, lambda: ("cpu", False)).precision == "fp32"
    other = spec.varied(1, True)
    assert (other.batch.micro, other.batch.grad_accum, other.batch.global_) == (1, 4, 8)
    assert other.ds["train_micro_batch_size_per_gpu"] == 1 and other.ds["gradient_accumulation_steps"] == 4
    assert other.activation_checkpointing and not spec.activation_checkpointing
    assert spec.ds["train_micro_batch_size_per_gpu"] == 2  # a variant is a copy
    with pytest.raises(BenchError, match="micro batch 3 x data-parallel 2 does not divide the global batch 8"):
        spec.varied(3, False)
    offload = spec_of(parse_args(["--ds_config", "ds_configs/dp_zero3_offload.json"]), 2, lambda: ("cuda", True))
    assert (offload.strategy, offload.peft, offload.zero_stage) == ("dp", "lora", 3) and "optimizer" in offload.offload


def test_a_run_recorded_flat_resumes_under_the_sectioned_configuration():
    """config.json written before the configuration had sections (flat "run") compares equal to the same flags
    now, and a changed run-defining flag is still named."""
    from bench.checkpoint import resume_differences
    from bench.config import recorded_flags
    cfg = parse_args(["--seq_len", "64", "--max_steps", "4"])
    now = {"run": cfg.to_dict(), "batch": {"global": 4, "micro": 2, "grad_accum": 1}, "ds_config": {}}
    older = {**now, "run": recorded_flags(cfg.to_dict())}
    del older["run"]["compile"]  # a flag added since reads as its default, what that run did
    assert older["run"]["seq_len"] == 64 and not any(isinstance(v, dict) for v in older["run"].values())
    assert resume_differences(older, now) == []
    longer = {**now, "run": cfg.with_flags(seq_len=128, max_steps=8).to_dict()}
    assert resume_differences(older, longer) == ["--seq_len: 64 when the run started, 128 now"]
    compiled = {**now, "run": cfg.with_flags(compile="on").to_dict()}
    assert resume_differences(older, compiled) == ['--compile: "off" when the run started, "on" now']
