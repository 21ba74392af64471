"""What most DeepSpeed users run instead of the harness: transformers' Trainer with the same ds_config.

It redoes a harness run's job (measurements/same_job.py): same model, weights, LoRA adapters, resolved ds_config,
and the harness's batches in the harness's order (the Trainer gets them ready-made: no sampler or shuffling of its
own). Its settings are the ones the ds_config implies (batch, learning rate and a constant schedule, clipping), so
the Trainer's checks of the ds_config against its arguments pass. Each rank writes its steps to
OUT/trainer-rankR.json (time from on_step_begin to on_step_end, device-synchronized; the loss and grad norm the
Trainer logs every step).

    torchrun --nproc_per_node 2 --master_port 29611 measurements/hf_trainer.py RUN_DIR OUT [--token_weighted]

By default the loss is each micro-batch's mean, as the harness and a bare DeepSpeed loop compute it.
--token_weighted keeps the Trainer's own default instead: the loss summed over the target tokens of all
accumulated micro-batches on all ranks, divided by their number (docs/parity.md says what that changes).
"""
import sys

import same_job  # measurements/same_job.py, next to this script


def main(run_dir: str, out_dir: str, token_weighted: bool) -> None:
    env, plan = same_job.load(run_dir)
    import torch
    import transformers
    from torch.utils.data import DataLoader

    ds, steps = plan.ds, plan.cfg.training.max_steps
    opt = ds["optimizer"]["params"]
    args = transformers.TrainingArguments(  # made before the model: under ZeRO-3 it turns on zero.Init
        output_dir=f"{out_dir}/trainer-files", deepspeed=ds, max_steps=steps,
        per_device_train_batch_size=plan.batch.micro, gradient_accumulation_steps=plan.batch.grad_accum,
        learning_rate=opt["lr"], weight_decay=opt.get("weight_decay", 0.0), adam_beta1=opt["betas"][0],
        adam_beta2=opt["betas"][1], adam_epsilon=opt["eps"], lr_scheduler_type="constant", warmup_steps=0,
        max_grad_norm=ds.get("gradient_clipping", 0.0), bf16=plan.dtype == torch.bfloat16,
        logging_steps=1, logging_strategy="steps", save_strategy="no", eval_strategy="no", report_to=[],
        disable_tqdm=True, seed=plan.cfg.training.seed, data_seed=plan.cfg.training.seed, dataloader_num_workers=0,
        average_tokens_across_devices=token_weighted, use_cpu=plan.device_type == "cpu")
    device = args.device
    model, keep_alive = same_job.build_model(plan, device)
    batches = same_job.batches(plan, env)
    # plain dicts of the harness's inputs (the DataLoader rebuilds a batch by its type), attention kwargs included
    micro = [dict(b) for step in range(steps) for b in batches.step_batches(step)]
    rec = same_job.StepRecorder(device)

    class Timing(transformers.TrainerCallback):
        def on_step_begin(self, *_, **__):
            rec.begin()

        def on_step_end(self, *_, **__):
            rec.stop()

        def on_log(self, _args, _state, _control, logs=None, **__):
            if logs and "loss" in logs:  # logged right after on_step_end, every step (logging_steps=1)
                rec.result(logs["loss"], logs.get("grad_norm"))

    class SameBatches(transformers.Trainer):
        def get_train_dataloader(self):
            return DataLoader(micro, batch_size=None, shuffle=False)  # the harness's micro-batches, as they are

    trainer = SameBatches(model=model, args=args, callbacks=[Timing()])
    if not token_weighted:
        trainer.model_accepts_loss_kwargs = False  # each micro-batch's mean loss, as DeepSpeed's own loop
    del keep_alive
    trainer.train()
    rec.write(out_dir, "trainer", env.rank)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], "--token_weighted" in sys.argv[3:])
    same_job.leave()
