"""The seam between the harness and a training engine.

The builder (bench/builder.py) makes the model — weights, LoRA, the strategy's sharding — and hands it to an
engine's `create`; from then on the trainer (bench/train.py) and the strategies' runners step it, the checkpoint
code saves and loads it, and the recorder asks it what it holds, all through the methods below and nothing else.
Strategies built on one engine's own features (DeepSpeed's pipeline engine and Ulysses) reach that engine through
its own attribute (DeepSpeedEngine.ds) and say so.
"""
from __future__ import annotations


class Engine:
    name = ""
    module = None     # the model as this rank trains it (its parameters: what this rank holds)
    optimizer = None  # what updates them (an engine's wrapper around a torch optimizer, or the optimizer)

    @classmethod
    def create(cls, plan, model) -> "Engine":
        """The engine training `model` as the plan says (its resolved config, precision, optimizer, batch)."""
        raise NotImplementedError

    def __call__(self, **batch):
        """One micro-batch's forward -> the model's output (with .loss)."""
        raise NotImplementedError

    def backward(self, loss) -> None:
        """One micro-batch's backward (the engine scales for gradient accumulation as it needs)."""
        raise NotImplementedError

    def step(self) -> None:
        """Called after every micro-batch's backward; at the accumulation boundary it reduces the gradients,
        clips them, updates the weights and zeroes the gradients."""
        raise NotImplementedError

    @property
    def skipped_steps(self) -> int:
        """Updates skipped so far (an fp16 overflow): a step whose count grew applied no update."""
        raise NotImplementedError

    def lr(self) -> float:
        raise NotImplementedError

    def grad_norm(self) -> float | None:
        """The global gradient norm of the last update, before clipping (None where the engine has none)."""
        raise NotImplementedError

    def train(self) -> None:
        raise NotImplementedError

    def eval(self) -> None:
        raise NotImplementedError

    def save(self, ckpt_dir: str, tag: str, client_state: dict) -> None:
        """Every rank's part of a checkpoint under ckpt_dir/tag, with the harness's own state."""
        raise NotImplementedError

    def load(self, ckpt_dir: str, tag: str) -> dict | None:
        """Load ckpt_dir/tag into the engine -> the harness's state saved with it (None: nothing loaded)."""
        raise NotImplementedError

    def describe(self) -> dict:
        """summary.json's `optimizer` (what updated the weights) and `dtypes` (what the engine holds)."""
        raise NotImplementedError
