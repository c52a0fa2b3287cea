"""K models of one variant, architecture, latent size and image shape trained as one (issue 12's packs).

Two ways to compute the K losses (PACK_WAYS): stacked, with the parameters and buffers stacked
(``torch.func.stack_module_state``: each (K, ...)) and one ``torch.func.vmap`` of ``functional_call`` over a
(K, B, C, H, W) batch; or one model after another in this process. Either way each model trains on its own images
with its own noise (drawn with its own generator, Autoencoder.draw_noise) and its own beta (a buffer, stacked with
the weights); gradients of the summed losses are each model's own, since no parameter is shared; and Adam is
element-wise, so one optimizer over all the tensors is K optimizers, one per model (bias correction counts steps,
the same for all). :meth:`Pack.unpack` gives back K ordinary models; a pack's checkpoint is K ordinary checkpoints.
"""

from __future__ import annotations

import copy
import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from workers.config import EvalConfig, ModelConfig, TrainConfig
from workers.data.base import ImageDataset
from workers.loop import (
    CHECKPOINT_FILE,
    PACK_FILE,
    BatchOrder,
    LossWindow,
    RunContext,
    build_optimizer,
    place_data,
    record_code_statistics,
    save_checkpoint_file,
    seed_everything,
    step_noise_generator,
    total_steps,
)
from workers.models import build_model
from workers.models.base import Autoencoder, LossModule, Noise


class _LossOf(nn.Module):
    """A model whose forward is its training loss, as (loss, parts): what functional_call (which calls forward)
    and vmap (which maps tensors, dicts and tuples) can take."""

    def __init__(self, model: Autoencoder):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, noise: Noise) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = self.model.loss(x, noise)
        return out.loss, out.parts


def pack_key(model: Autoencoder) -> tuple:
    """What models must share to be packed: everything but what is stacked (weights, beta)."""
    config = model.config.model_dump(exclude={"beta"})
    return (type(model).__name__, repr(sorted(config.items())), tuple(model.image_shape), model.dataset_size)


# How a pack computes its K losses. "vmap": stacked weights, one vmap'd pass (the kernels of K models as one:
# what a GPU, bound by kernel launches for a model this small, gains from). "loop": the K models one after the
# other in this process (no stacking; on 2 CPU cores, K = 1 to 64 of conv64 beta-TCVAE at batch 64 ran at
# 1.00-1.39x one model's images/s, vmap at 0.59-0.93x: benchmarks/bench_pack.py). Either way the members train as
# they would alone.
PACK_WAYS = ("vmap", "loop")


def pack_way(device: torch.device, gathers: bool = False) -> str:
    """The faster way on ``device``: vmap on a GPU, one after another on a CPU (measured: PACK_WAYS). ``gathers``:
    the loss gathers across ranks (beta-TCVAE's global batch under DDP), which a collective inside vmap cannot:
    one after another."""
    return "vmap" if device.type == "cuda" and not gathers else "loop"


class Pack:
    """K models trained as one, computed ``how`` (PACK_WAYS). With "vmap" the models' modules are left as they are
    until :meth:`unpack` writes the trained tensors back; with "loop" they train in place, each through its entry
    of ``loss_modules`` when given (a DDP-wrapped LossModule per model: its gradients are all-reduced as a model's
    alone are)."""

    def __init__(self, models: list[Autoencoder], how: str = "vmap", loss_modules: list[nn.Module] | None = None):
        if not models:
            raise ValueError("a pack needs at least one model")
        if how not in PACK_WAYS:
            raise ValueError(f"a pack is computed by {' or '.join(PACK_WAYS)}, not {how!r}")
        if len({pack_key(m) for m in models}) > 1:
            raise ValueError(
                "models in one pack must share variant, architecture, latent size, image shape and "
                "every other model setting but beta"
            )
        if loss_modules is not None and how != "loop":
            raise ValueError("a pack's own loss modules (DDP) are for the loop way")
        self.models = models
        self.how = how
        self._loss_modules = loss_modules
        self._per_model = len(list(models[0].parameters()))
        if how == "vmap":
            wrapped = [_LossOf(m) for m in models]
            self.params, self.buffers = stack_module_state(wrapped)  # params are new leaves that require grad
            self._base = copy.deepcopy(wrapped[0]).to("meta")  # the code; its tensors are swapped for each model's
            self._losses = vmap(self._one_loss, in_dims=(0, 0, 0, 0))

    def __len__(self) -> int:
        return len(self.models)

    def _one_loss(self, params, buffers, x, noise):
        return functional_call(self._base, (params, buffers), (x, noise))

    def parameters(self) -> list[torch.Tensor]:
        """What the optimizer steps: the stacked tensors (vmap), or every model's parameters in model order (loop).
        Adam is element-wise, so one optimizer over them is one per model."""
        if self.how == "vmap":
            return list(self.params.values())
        return [p for model in self.models for p in model.parameters()]

    def draw_noise(self, x: torch.Tensor, generators: list[torch.Generator]) -> Noise:
        """Each model's noise for its batch ``x[k]`` from its own generator, stacked: (K, ...) per name."""
        drawn = [model.draw_noise(x[k], generators[k]) for k, model in enumerate(self.models)]
        return {name: torch.stack([d[name] for d in drawn]) for name in drawn[0]}

    def losses(self, x: torch.Tensor, noise: Noise) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The K models' losses (K,) and loss parts (each (K,)) on their batches ``x`` (K, B, C, H, W)."""
        if x.shape[0] != len(self):
            raise ValueError(f"a pack of {len(self)} models takes {len(self)} batches, not {x.shape[0]}")
        if self.how == "vmap":
            return self._losses(self.params, self.buffers, x, noise)
        modules = self._loss_modules or [LossModule(model) for model in self.models]
        outs = [module(x[k], {name: value[k] for name, value in noise.items()}) for k, module in enumerate(modules)]
        return (
            torch.stack([o.loss for o in outs]),
            {name: torch.stack([o.parts[name] for o in outs]) for name in outs[0].parts},
        )

    def clip_gradients(self, max_norm: float) -> None:
        """``train.grad_clip`` for each model apart, as clip_grad_norm_ in a run of its own (one norm over the
        whole pack would mix the models)."""
        if self.how == "loop":
            for model in self.models:
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            return
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        norms = torch.stack([g.flatten(1).pow(2).sum(dim=1) for g in grads]).sum(dim=0).sqrt()  # (K,)
        scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(scale.view(-1, *([1] * (g.dim() - 1))))

    @torch.no_grad()
    def unpack(self) -> list[Autoencoder]:
        """The K models, holding the pack's trained parameters. (Buffers are not trained: beta stays, and code
        statistics recorded into a model stay.)"""
        if self.how == "vmap":
            for k, model in enumerate(self.models):
                for name, tensor in model.named_parameters():
                    tensor.copy_(self.params[f"model.{name}"][k])
        return self.models

    def split_optimizer_state(self, state: dict, k: int) -> dict:
        """Model k's part of the pack optimizer's state_dict: the state_dict the same optimizer would have over that
        model's own parameters (Adam's moments are element-wise; its step count is the same for all)."""
        n = self._per_model
        if self.how == "vmap":

            def take(value):
                return value[k].clone() if torch.is_tensor(value) and value.dim() > 0 else value

            own = {i: {name: take(v) for name, v in values.items()} for i, values in state["state"].items()}
        else:
            own = {i - k * n: copy.deepcopy(values) for i, values in state["state"].items() if k * n <= i < (k + 1) * n}
        groups = copy.deepcopy(state["param_groups"])
        for group in groups:
            group["params"] = list(range(n))
        return {"state": own, "param_groups": groups}

    def stack_optimizer_states(self, states: list[dict]) -> dict:
        """The pack optimizer's state_dict from its models' (the inverse of :meth:`split_optimizer_state`)."""
        n = self._per_model
        groups = copy.deepcopy(states[0]["param_groups"])
        for group in groups:
            group["params"] = list(range(n if self.how == "vmap" else n * len(states)))
        if self.how == "vmap":

            def stack(i, name, value):
                if torch.is_tensor(value) and value.dim() > 0:
                    return torch.stack([s["state"][i][name] for s in states])
                return value

            merged = {
                i: {name: stack(i, name, v) for name, v in values.items()} for i, values in states[0]["state"].items()
            }
        else:
            merged = {k * n + i: values for k, s in enumerate(states) for i, values in s["state"].items()}
        return {"state": merged, "param_groups": groups}


# --- checkpoints: a folder of the members' own ---------------------------------------------------------------


def member_folder(k: int) -> str:
    return f"member_{k:03d}"


# --- the loop of a pack --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PackMember:
    """One model of a pack: its model settings (beta may differ between members), its seed (its initial weights,
    data order and noise, as the same seed gives a run of its own), and its name (a sweep trial's run name, which
    its progress lines carry)."""

    model_config: ModelConfig
    seed: int
    name: str | None = None


# Called at each log point and after the final evaluation with (member index, metrics, step): where a member's
# curves go (its own MLflow run, in a sweep).
MemberLog = Callable[[int, dict[str, float], int], None]


@dataclass
class MemberResult:
    """What one member's training came to: its model (trained weights, or as it stood when it failed), its curves
    and final metrics, and, when it diverged, the step and the loss part that first was not finite; when the pack
    was asked to stop (``ctx.stop_requested``), the step it checkpointed at and returned, unevaluated."""

    model: Autoencoder
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    final_metrics: dict[str, float] = field(default_factory=dict)
    failed: tuple[int, str] | None = None
    resumed_from_step: int = 0
    stopped_at_step: int | None = None


def train_pack(
    members: list[PackMember],
    train_config: TrainConfig,
    eval_config: EvalConfig,
    train_data: ImageDataset,
    val_data: ImageDataset,
    ctx: RunContext | None = None,
    *,
    dataset_size: int | None = None,
    full_data: ImageDataset | None = None,
    spec_jsons: list[str] | None = None,
    evaluate_at_end: bool = True,
    pictures: bool = True,
    how: str | None = None,
    log: MemberLog | None = None,
) -> list[MemberResult]:
    """Train ``members`` as one pack in this process: each as :func:`workers.loop.train` would train it alone with
    its seed (same initial weights, data order and noise), to float rounding. A member whose loss stops being
    finite is marked failed at that step and part, and is no longer trained; the others go on.

    Checkpoints (every ``checkpoint_every`` steps and at the end, through ``ctx``) are a folder holding each
    member's ordinary checkpoint (``member_000/checkpoint.pt``, ...: load_model_from_checkpoint reads it, and a run
    of that member alone resumes from it) and pack.json (the members and which failed where). Running the pack
    again with the same ``ctx`` resumes from its last one; asked to stop (``ctx.stop_requested``), the pack
    checkpoints at the end of the current log window and returns, each member's ``stopped_at_step`` set and nothing
    evaluated. ``spec_jsons``: each member's job spec, kept in its
    checkpoint. ``how``: PACK_WAYS (default: the faster on the device, pack_way). ``log``: where each member's
    curves and evaluation go (:data:`MemberLog`). With ``ctx.run_dir``, each finished member's pictures go to
    ``<run_dir>/member_<k>/pictures``."""
    ctx = ctx or RunContext()
    device, cfg, k_models = ctx.device, train_config, len(members)
    if eval_config.factors is not None:  # a misnamed factor fails now, not after the last step
        from workers.metrics import check_scored_factors

        check_scored_factors(eval_config, full_data if full_data is not None else val_data)
    dataset_size = dataset_size or len(train_data) * ctx.world_size
    models = []
    for member in members:
        seed_everything(member.seed)
        models.append(build_model(member.model_config, train_data.image_shape, dataset_size).to(device))
    generators = [step_noise_generator(m.seed, ctx.rank, device) for m in members]
    results = [MemberResult(model=m) for m in models]
    start_step, optimizer_states = 0, None
    resume = ctx.latest_checkpoint()
    if resume is not None:
        start_step, optimizer_states = _restore(Path(resume), members, results, generators, device)
    how = how or pack_way(device, gathers=ctx.gather is not None)
    if how == "loop":
        # Each model through its own loss module, wrapped as the loop wraps one model (DDP under Ray Train), and
        # gathering its own global batch.
        pack = Pack(models, how, loss_modules=[ctx.wrap(LossModule(m, gather=ctx.gather)) for m in models])
    elif ctx.gather is not None:
        raise ValueError("a vmap'd pack cannot gather across ranks (beta-TCVAE's global batch): use the loop way")
    else:
        pack = Pack(models, how)
    optimizer = build_optimizer(pack.parameters(), cfg)
    # DDP averages a model's gradients over the ranks; stacked tensors have no DDP module, so the same here.
    average = how == "vmap" and ctx.world_size > 1
    if optimizer_states is not None:
        optimizer.load_state_dict(pack.stack_optimizer_states(optimizer_states))
    train_data = place_data(train_data, device)
    n_steps = total_steps(cfg, len(train_data))
    # False once a member failed: its loss no longer counts.
    training = torch.tensor([r.failed is None for r in results], dtype=torch.bool, device=device)
    windows: list[LossWindow | None] = [None] * k_models
    orders = [BatchOrder(len(train_data), m.seed, ctx.rank, cfg.batch_size, train_data.device) for m in members]

    for step in range(start_step, n_steps):
        x = torch.stack([train_data.images(order.rows(step)).to(device, non_blocking=True) for order in orders])
        noise = pack.draw_noise(x, generators)
        optimizer.zero_grad(set_to_none=True)
        losses, parts = pack.losses(x, noise)
        # A failed member's loss no longer counts: no gradient reaches its weights.
        torch.where(training, losses, torch.zeros_like(losses)).sum().backward()
        if average:
            for tensor in pack.parameters():
                grad = tensor.grad
                assert grad is not None, "backward() gives every parameter of the pack a gradient"
                torch.distributed.all_reduce(grad)
                grad /= ctx.world_size
        if cfg.grad_clip is not None:
            pack.clip_gradients(cfg.grad_clip)
        optimizer.step()
        for k in range(k_models):
            window = windows[k]
            if window is None:
                window = windows[k] = LossWindow(["loss", *parts], device, first_step=step)
            window.add(losses[k], {name: value[k] for name, value in parts.items()})

        done = step + 1
        # A stop request (preemption), as workers.loop.train takes it: at a log window's end, with a checkpoint at
        # this very step, so that the resumed pack loses no work.
        stop_now = done % cfg.log_every == 0 and done != n_steps and ctx.stop_requested()
        if done % cfg.log_every == 0 or done == n_steps:
            for k, result in enumerate(results):
                if result.failed is not None:
                    continue
                window = windows[k]
                assert window is not None, "every member's window is made at the first step"
                means, diverged = window.read()
                if diverged is not None:
                    result.failed = diverged
                    training[k] = False
                    continue
                metrics = {f"train/{name}": value for name, value in means.items()}
                for name, value in metrics.items():
                    result.history.setdefault(name, []).append((done, value))
                result.final_metrics.update(metrics)
                if ctx.is_chief and log is not None:
                    log(k, metrics, done)
                ctx.log_progress(done, n_steps, metrics=metrics, trial=members[k].name)
        if done == n_steps and ctx.is_chief:
            # Before the final checkpoint, which saves them with the weights (models/base.py's traversals).
            for model, member, result in zip(pack.unpack(), members, results):
                if result.failed is None:
                    record_code_statistics(model, train_data, member.seed)
        if done % cfg.checkpoint_every == 0 or done == n_steps or stop_now:
            _save(pack, optimizer, members, results, generators, done, ctx, cfg, spec_jsons)
        if stop_now:
            pack.unpack()
            for result in results:
                result.stopped_at_step = done
            return results

    pack.unpack()
    if evaluate_at_end and ctx.is_chief:
        from workers.metrics import evaluate
        from workers.plots import make_run_pictures

        for k, (member, result) in enumerate(zip(members, results)):
            if result.failed is not None:
                continue
            result.model.eval()
            evaluated = evaluate(
                result.model,
                val_data,
                eval_config,
                seed=member.seed,
                full=full_data,
                train=train_data,
                on_metric=ctx.metric_progress(trial=member.name),
            )
            result.final_metrics.update(evaluated)
            for name, value in evaluated.items():
                result.history.setdefault(name, []).append((n_steps, value))
            if log is not None:
                log(k, evaluated, n_steps)
            if pictures and eval_config.pictures and ctx.run_dir is not None:
                ctx.log_phase("pictures", trial=member.name)
                make_run_pictures(
                    result.model,
                    train_data,
                    val_data,
                    ctx.run_dir / member_folder(k) / "pictures",
                    seed=member.seed,
                    history=result.history,
                )
    return results


def _save(
    pack: Pack,
    optimizer,
    members: list[PackMember],
    results: list[MemberResult],
    generators: list[torch.Generator],
    step: int,
    ctx: RunContext,
    cfg: TrainConfig,
    spec_jsons: list[str] | None,
) -> None:
    """One checkpoint of the pack through ``ctx``: every member's own checkpoint, and pack.json."""
    models = pack.unpack()  # the members' modules hold the pack's weights as of this step
    state = optimizer.state_dict()
    with tempfile.TemporaryDirectory(prefix="aeforge-ckpt-") as tmp:
        if ctx.is_chief:
            for k, model in enumerate(models):
                folder = Path(tmp) / member_folder(k)
                folder.mkdir()
                save_checkpoint_file(
                    folder / CHECKPOINT_FILE,
                    model,
                    pack.split_optimizer_state(state, k),
                    step,
                    results[k].history,
                    spec_jsons[k] if spec_jsons else None,
                    generators[k],
                )
            record = {
                "step": step,
                "members": [
                    {
                        "seed": m.seed,
                        "folder": member_folder(k),
                        "failed": list(failed) if (failed := results[k].failed) else None,
                    }
                    for k, m in enumerate(members)
                ],
            }
            (Path(tmp) / PACK_FILE).write_text(json.dumps(record, indent=1), encoding="utf-8")
        ctx.save_checkpoint(Path(tmp), {}, step, cfg.num_to_keep)


def _restore(
    folder: Path,
    members: list[PackMember],
    results: list[MemberResult],
    generators: list[torch.Generator],
    device: torch.device,
) -> tuple[int, list[dict]]:
    """Load a pack checkpoint into the members' models, curves, failures and noise generators; returns the step
    and the members' optimizer states."""
    record = json.loads((folder / PACK_FILE).read_text(encoding="utf-8"))
    if [m["seed"] for m in record["members"]] != [m.seed for m in members]:
        raise ValueError(
            f"the pack checkpoint in {folder} holds members with seeds "
            f"{[m['seed'] for m in record['members']]}, not {[m.seed for m in members]}"
        )
    states = []
    for k, entry in enumerate(record["members"]):
        state = torch.load(folder / entry["folder"] / CHECKPOINT_FILE, map_location=device, weights_only=False)
        results[k].model.load_state_dict(state["model"])
        results[k].history = {name: [tuple(p) for p in curve] for name, curve in state["history"].items()}
        results[k].failed = tuple(entry["failed"]) if entry["failed"] else None
        results[k].resumed_from_step = int(state["step"])
        if state.get("noise_rng") is not None:
            generators[k].set_state(state["noise_rng"].cpu())
        states.append(state)
    return int(record["step"]), [s["optimizer"] for s in states]


# --- how many fit ------------------------------------------------------------------------------------------


def training_bytes(
    model_config: ModelConfig, image_shape: tuple[int, int, int], dataset_size: int, batch_size: int
) -> int:
    """Memory one model of a pack needs to train at ``batch_size``: its weights, gradients and Adam's two moments
    (4 x the parameters), and the activations its loss keeps for the backward pass, counted by running the loss on
    the meta device (shapes only, no memory, no time)."""
    saved = 0

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += tensor.numel() * tensor.element_size()
        return tensor

    with torch.device("meta"):
        model = build_model(model_config, image_shape, dataset_size)
        x = torch.zeros((batch_size, *image_shape))
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
            model.loss(x, model.draw_noise(x))
    parameters = sum(p.numel() * p.element_size() for p in model.parameters())
    return 4 * parameters + saved
