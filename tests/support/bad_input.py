"""Bad input the harness must refuse with one line: the cases (tests/unit/test_bad_input.py runs each in this
process, tests/integration/test_bad_input_launched.py a few as real launches) and the files they name, written
by the bad_files fixture (tests/conftest.py)."""

import json

ZERO2 = ("--ds_config", "ds_configs/dp_zero2.json")


def write_bad_files(d):
    """The malformed and refused ds_configs and data files the cases name as {d}/..."""
    (d / "bad.json").write_text('{\n  "train_batch_size": 4,\n  "zero_optimization": {"stage": 2,}\n}\n')
    (d / "list.json").write_text("[1, 2]\n")
    (d / "nozero.json").write_text('{"train_batch_size": "auto"}\n')
    (d / "tp4.json").write_text(json.dumps({"zero_optimization": {"stage": 1}, "tensor_parallel": {"autotp_size": 4}}))
    (d / "ep3.json").write_text(json.dumps({"zero_optimization": {"stage": 1}, "expert_parallel": {
        "enabled": True, "autoep_size": 3, "preset_model": "mixtral"}}))
    (d / "pp5.json").write_text(json.dumps({"zero_optimization": {"stage": 1}, "pipeline": {"stages": 5}}))
    (d / "pp2_zero2.json").write_text(json.dumps({"zero_optimization": {"stage": 2}, "pipeline": {"stages": 2}}))
    (d / "tp2.json").write_text(json.dumps({"zero_optimization": {"stage": 1}, "tensor_parallel": {"autotp_size": 2}}))
    (d / "notsquad.json").write_text(json.dumps({"data": [{"title": "x", "paragraphs": [{"context": "c"}]}]}))
    (d / "broken.jsonl").write_text('{"text": "fine"}\n{"txt": "no text field"}\n')
    (d / "short.txt").write_text("too short\n")
    (d / "sp3.json").write_text(json.dumps({"zero_optimization": {"stage": 1}, "sequence_parallel_size": 3}))
    (d / "sp2_pp2.json").write_text(json.dumps({"zero_optimization": {"stage": 1}, "sequence_parallel_size": 2,
                                                "pipeline": {"stages": 2}}))
    (d / "sp2_ep2_zero3.json").write_text(json.dumps({"zero_optimization": {"stage": 3}, "sequence_parallel_size": 2,
                                                       "expert_parallel": {"enabled": True, "autoep_size": 2,
                                                                           "preset_model": "mixtral"}}))
    (d / "deepcompile.json").write_text(json.dumps({"zero_optimization": {"stage": 2},
                                                     "compile": {"deepcompile": True}}))
    (d / "tp2_nothing.json").write_text(json.dumps({"zero_optimization": {"stage": 1}, "tensor_parallel": {
        "autotp_size": 2, "partition_config": {"use_default_specs": False, "layer_specs": [
            {"patterns": [r".*\.q_proj$"], "partition_type": "column"}]}}}))


CASES = [  # (id, args, ranks, expected part of the error line)
    ("missing-ds-config", ("--ds_config", "nope.json"), 1, "ds_config not found: nope.json"),
    ("malformed-ds-config", ("--ds_config", "{d}/bad.json"), 1, "bad.json:3:"),
    ("ds-config-not-object", ("--ds_config", "{d}/list.json"), 1, "must be a JSON object"),
    ("no-zero-section", ("--ds_config", "{d}/nozero.json"), 1, "needs a 'zero_optimization' section"),
    ("unknown-strategy", ("--strategy", "magic", *ZERO2), 1, "unknown strategy 'magic'"),
    ("unknown-model", ("--model", "gpt-17", *ZERO2), 1, "unknown model 'gpt-17'"),
    ("missing-data", ("--data", "./no/such.json", *ZERO2), 1, "data file not found"),
    ("not-squad", ("--data", "{d}/notsquad.json", *ZERO2), 1, "not SQuAD v1.1 format"),
    ("broken-jsonl", ("--data", "{d}/broken.jsonl", *ZERO2), 1, "broken.jsonl:2: expected a JSON object"),
    ("text-too-short", ("--data", "{d}/short.txt", *ZERO2), 1, "fewer than one --seq_len"),
    ("zero-steps", ("--max_steps", "0", *ZERO2), 1, "--max_steps must be positive"),
    ("negative-micro", ("--micro_batch_size", "-1", *ZERO2), 1, "--micro_batch_size must be positive"),
    ("not-an-int", ("--max_steps", "ten", *ZERO2), 1, "invalid int value"),
    ("no-measured-step", ("--max_steps", "2", "--warmup_steps", "2", *ZERO2), 1, "must exceed --warmup_steps"),
    ("dense-flash", ("--attn_mask", "dense", "--attn_implementation", "flash_attention_2", *ZERO2), 1,
     "--attn_mask dense builds transformers' dense masks"),
    ("seq-too-long", ("--seq_len", "65536", *ZERO2), 1, "exceeds the model's max_position_embeddings"),
    ("bad-lora-target", ("--peft", "lora", "--lora_targets", "qq_proj", *ZERO2), 1, "no module named ['qq_proj']"),
    ("batch-arithmetic", ("--global_batch_size", "6", "--micro_batch_size", "2", *ZERO2), 2,
     "global batch 6 is not divisible by micro batch 2 x DP 2 = 4"),
    ("layout-mismatch", ("--ds_config", "{d}/tp4.json"), 2, "dp(?)*tp(4)*ep(1)*pp(1)*sp(1) != WORLD_SIZE(2)"),
    ("too-few-processes", ("--strategy", "tp", "--ds_config", "ds_configs/tp2.json"), 1,
     "start that many processes (deepspeed --num_gpus 2 bench/run.py ..."),
    ("world-size-without-dry-run", ("--world_size", "2", *ZERO2), 1,
     "--world_size only plans a layout with --dry_run"),
    ("foreign-section", ("--strategy", "dp", "--ds_config", "{d}/tp2.json"), 2, "'tensor_parallel' section"),
    # model parallelism (tp, ep, tp_ep)
    ("tp-without-section", ("--strategy", "tp", *ZERO2), 1, "--strategy tp needs \"tensor_parallel\""),
    ("tp-not-dividing-kv-heads", ("--strategy", "tp", "--ds_config", "ds_configs/tp4.json"), 4,
     "TP 4 must divide the attention heads (4) and key/value heads (2)"),
    ("ep-not-dividing-experts", ("--strategy", "ep", "--model", "tiny-mixtral", "--ds_config", "{d}/ep3.json"), 3,
     "EP 3 must divide the number of experts (4)"),
    ("ep-on-dense-model", ("--strategy", "ep", "--ds_config", "ds_configs/ep2.json"), 2,
     "expert parallelism needs a mixture-of-experts model"),
    ("ep-with-tp-section", ("--strategy", "ep", "--model", "tiny-mixtral", "--ds_config", "ds_configs/tp2.json"), 2,
     "--strategy ep got a ds_config with a 'tensor_parallel' section"),
    ("tp-ep-world-too-small", ("--strategy", "tp_ep", "--model", "tiny-mixtral", "--ds_config",
                               "ds_configs/tp2_ep2.json"), 2, "dp(?)*tp(2)*ep(2)*pp(1)*sp(1) != WORLD_SIZE(2)"),
    ("tp-shards-nothing", ("--strategy", "tp", "--model", "tiny-mixtral", "--ds_config", "{d}/tp2_nothing.json"), 2,
     "matches no parameter of the model"),
    ("lora-on-the-head-with-tp", ("--strategy", "tp", "--peft", "lora", "--lora_targets", "q_proj,lm_head",
                                  "--ds_config", "ds_configs/tp2.json"), 2,
     "--lora_targets ['lm_head'] under tensor parallelism"),
    ("lora-on-the-router-with-ep", ("--strategy", "ep", "--peft", "lora", "--lora_targets", "q_proj,gate",
                                    "--model", "tiny-mixtral", "--ds_config", "ds_configs/ep2.json"), 2,
     "--lora_targets ['gate'] under expert parallelism"),
    ("lora-on-the-router-with-tp-ep", ("--strategy", "tp_ep", "--peft", "lora", "--lora_targets", "q_proj,gate",
                                       "--model", "tiny-mixtral", "--ds_config", "ds_configs/tp2_ep2.json"), 4,
     "--lora_targets ['gate'] under tensor parallelism"),
    # sequence parallelism (sp)
    ("sp-without-size", ("--strategy", "sp", *ZERO2), 1, "--strategy sp needs \"sequence_parallel_size\""),
    ("sp-seq-len-not-divisible", ("--strategy", "sp", "--ds_config", "ds_configs/sp2.json", "--seq_len", "255"), 2,
     "--seq_len 255 is not divisible by the sequence-parallel size 2"),
    ("sp-not-dividing-heads", ("--strategy", "sp", "--ds_config", "{d}/sp3.json", "--seq_len", "96"), 3,
     "sequence-parallel size 3 must divide the attention heads (4)"),
    ("sp-with-eager-attention", ("--strategy", "sp", "--ds_config", "ds_configs/sp2.json", "--attn_implementation",
                                 "eager"), 2, "--attn_implementation eager cannot run under sequence parallelism"),
    ("sp-with-pipeline", ("--strategy", "sp", "--ds_config", "{d}/sp2_pp2.json"), 4,
     "sequence parallelism with pipeline parallelism is refused"),
    ("pp-with-sp-size", ("--strategy", "pp", "--ds_config", "{d}/sp2_pp2.json"), 4,
     "--strategy pp got a ds_config with a 'sequence_parallel_size' section"),
    ("sp-ep-zero3", ("--strategy", "sp", "--model", "tiny-mixtral", "--ds_config", "{d}/sp2_ep2_zero3.json"), 2,
     "AutoEP with ZeRO-3 under sequence parallelism is refused"),
    ("sp-ep-on-dense-model", ("--strategy", "sp", "--ds_config", "ds_configs/sp2_ep2.json"), 2,
     "expert parallelism needs a mixture-of-experts model"),
    ("tiled-without-sp", ("--tiled_loss", *ZERO2), 1,
     "--tiled_mlp and --tiled_loss run with --strategy sp (they need its sp dimension)"),
    ("tiled-mlp-on-experts", ("--strategy", "sp", "--model", "tiny-mixtral", "--ds_config", "ds_configs/sp2.json",
                              "--tiled_mlp"), 2, "--tiled_mlp tiles dense MLPs"),
    # checkpoints and resume
    ("compile-backend-without-compile", ("--compile_backend", "aot_eager", *ZERO2), 1,
     "--compile_backend aot_eager picks what compiles the model: add --compile on"),
    ("deepcompile-without-compile", ("--ds_config", "{d}/deepcompile.json"), 1,
     "asks for DeepCompile (compile.deepcompile), which runs through engine.compile(): add --compile on"),
    ("deepcompile-on-the-cpu", ("--compile", "on", "--ds_config", "{d}/deepcompile.json"), 1,
     "DeepCompile needs CUDA: deepspeed/compile/util.py is_deepcompile_supported() is false off CUDA"),
    ("compile-tp-on-the-cpu", ("--compile", "on", "--strategy", "tp", "--ds_config", "ds_configs/tp2.json"), 2,
     "--compile on with --strategy tp: step 1 never completes on the CPU"),
    ("checkpoint-dir-is-a-file", ("--checkpoint_dir", "{d}/short.txt", *ZERO2), 1, "exists and is not a directory"),
    ("resume-without-run-name", ("--resume", "auto", *ZERO2), 1, "--resume auto needs --run_name"),
    ("negative-save-interval", ("--save_interval", "-1", *ZERO2), 1, "must be >= 0"),
    # pipeline
    ("more-stages-than-layers", ("--strategy", "pp", "--ds_config", "{d}/pp5.json"), 5,
     "5 pipeline stages but the model has only 4 decoder layers"),
    ("mixtral-under-pp", ("--strategy", "pp", "--model", "tiny-mixtral", "--ds_config", "ds_configs/pp2.json"), 2,
     "Mixtral under PP is refused"),
    ("hybrid-without-dp", ("--strategy", "hybrid", "--ds_config", "ds_configs/pp2_dp2.json"), 2,
     "--strategy hybrid needs data parallelism beside the pipeline"),
    ("pp-with-zero2", ("--strategy", "pp", "--ds_config", "{d}/pp2_zero2.json"), 2, "supports ZeRO stage 0 or 1"),
    ("pp-micro-arithmetic", ("--strategy", "pp", "--ds_config", "ds_configs/pp2.json", "--global_batch_size", "3",
                             "--micro_batch_size", "2"), 2, "global batch 3 is not divisible by micro batch 2"),
]


def args_of(case, files) -> list[str]:
    return [a.replace("{d}", str(files)) for a in case[1]]
