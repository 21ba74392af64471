"""The reference a harness run is measured against: a bare DeepSpeed training loop with nothing but the work.

It reads a harness run's config.json so it trains the same model with the same resolved ds_config, batch and
data; it times the same steps the same way (device-synchronized wall clock) and prints one JSON line.
    python measurements/bare_deepspeed.py RUN_DIR
"""
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(run_dir: str) -> None:
    import deepspeed
    import torch
    from transformers import AutoModelForCausalLM

    from bench import data, models
    from bench.strategies.common import apply_lora
    from bench.config import RunConfig

    with open(os.path.join(run_dir, "config.json")) as fh:
        recorded = json.load(fh)
    cfg, ds = RunConfig(**recorded["run"]), recorded["ds_config"]
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": "29517"}.items():
        os.environ.setdefault(k, v)
    deepspeed.init_distributed(verbose=False)
    _, source = models.resolve_model_source(cfg.model, cfg.init)
    tok = models.load_tokenizer(source)
    train, _ = data.load_dataset(cfg.data, tok, cfg.seq_len, cfg.val_fraction, cfg.seed)
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_pretrained(source)
    model.config.use_cache = False
    if cfg.peft == "lora":
        model = apply_lora(model, cfg)
    engine, *_ = deepspeed.initialize(model=model, config=ds,
                                      model_parameters=[p for p in model.parameters() if p.requires_grad])
    batches = data.ShardedBatches(train, ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"],
                                  1, 0, cfg.seed)
    device = engine.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t_measure = None
    for step in range(cfg.max_steps):
        if step == cfg.warmup_steps:
            sync()
            t_measure = time.perf_counter()
        for b in batches.step_batches(step):
            out = engine(**{k: v.to(device) for k, v in b.items()})
            engine.backward(out.loss)
            engine.step()
        float(out.loss)  # the harness reads the loss every step too
    sync()
    wall = time.perf_counter() - t_measure
    print(json.dumps({"measured_steps": cfg.max_steps - cfg.warmup_steps, "wall_s": wall}))


if __name__ == "__main__":
    main(sys.argv[1])
