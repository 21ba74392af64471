"""The reference a harness run is measured against: a bare DeepSpeed training loop with nothing but the work.

It redoes a harness run's job (measurements/same_job.py: same model, weights, LoRA, resolved ds_config and
batches), times each step the way the harness does (device-synchronized, around forward/backward/step), and
writes each rank's steps to OUT/bare-rankR.json. Launch it as the harness run was launched, e.g.
    torchrun --nproc_per_node 2 --master_port 29611 measurements/bare_deepspeed.py RUN_DIR OUT
"""
import sys

import same_job  # measurements/same_job.py, next to this script


def main(run_dir: str, out_dir: str) -> None:
    env, plan = same_job.load(run_dir)
    import deepspeed

    from bench import device as devices
    index = devices.select(env.local_rank)  # as the harness does: the rank's own device before any collective
    deepspeed.init_distributed(verbose=False)
    device = devices.torch_device(index)
    model, keep_alive = same_job.build_model(plan, device)
    engine, *_ = deepspeed.initialize(model=model, config=plan.ds,
                                      model_parameters=[p for p in model.parameters() if p.requires_grad])
    del keep_alive
    engine.train()  # as the harness and the Trainer do (from_pretrained returns the model in eval mode)
    batches, rec = same_job.batches(plan, env), same_job.StepRecorder(device)
    for step in range(plan.cfg.training.max_steps):
        micro = [b.to(device) for b in batches.step_batches(step)]  # the harness's inputs, attention kwargs too
        rec.begin()
        loss_sum = 0.0
        for b in micro:
            out = engine(**b)
            engine.backward(out.loss)
            engine.step()
            loss_sum = loss_sum + out.loss.detach().float()
        rec.stop()
        rec.result(float(loss_sum / len(micro)), engine.get_global_grad_norm())
    rec.write(out_dir, "bare", env.rank)


if __name__ == "__main__":
    main(*sys.argv[1:3])
    same_job.leave()
