"""What the loop's images/s counts: its timed training steps, not the work after the last step (the code
statistics, the final checkpoint, the final evaluation). Checked with a fake clock, so no test here depends on
how fast this machine is."""

from __future__ import annotations

import torch

from workers import loop
from workers.config import EvalConfig, ModelConfig, TrainConfig
from workers.data.dsprites import DSprites
from workers.loop import RunContext, train

END_OF_RUN_SECONDS = 1_000_000.0


class FakeClock:
    """``time.perf_counter`` that moves one second per reading, plus whatever ``advance`` adds."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        self.now += 1.0
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class SlowCheckpointContext(RunContext):
    """Saving a checkpoint takes END_OF_RUN_SECONDS on the fake clock; records at which steps it was called."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(device=torch.device("cpu"))
        self.clock = clock
        self.saved_at: list[int] = []

    def save_checkpoint(self, directory, metrics, step, keep) -> None:
        self.saved_at.append(step)
        self.clock.advance(END_OF_RUN_SECONDS)

    def log_progress(self, *args, **kwargs) -> None:
        return None


def test_images_per_second_leaves_out_the_end_of_run_work(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(loop, "time", clock)
    ctx = SlowCheckpointContext(clock)
    data = DSprites(limit=64)
    model = ModelConfig(variant="ae", architecture="mlp", latent_dim=2, hidden_dims=[8])
    config = TrainConfig(steps=6, batch_size=8, log_every=3, checkpoint_every=10**6)
    result = train(model, config, EvalConfig(), data, data, ctx, evaluate_at_end=False, pictures=False, warmup_steps=2)
    assert ctx.saved_at == [6]  # the final checkpoint ran, after the clock stopped
    assert 0 < result.seconds < END_OF_RUN_SECONDS
    assert result.images_per_second == (6 - 2) * 8 / result.seconds
    assert result.final_metrics["perf/images_per_second"] == result.images_per_second
