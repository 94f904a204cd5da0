"""Knowledge distillation: train a (pruned, factored) student to match its teacher again.

``torchkiln.distill(student, teacher, train_data, ...)`` and the ``distill`` pass (which trains the
program's graph toward the eager model, with ``compile(..., train_data=...)``) share one loop.

Loss per batch, with logits ``s`` (student) and ``t`` (teacher), temperature ``T`` and labels ``y``
when the batch has them::

    loss = alpha * T² * KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) * cross_entropy(s, y)

(``alpha = 1`` without labels). A batch is ``inputs`` or ``(inputs, labels)`` with integer labels;
``inputs`` is a tensor, a tuple or a dict, as the model is called. Optimizers SGD (momentum 0.9),
Adam, AdamW; schedules constant or cosine, both after ``warmup_steps`` of linear warm-up.
Validation each epoch (top-1 with labels, else the distillation loss) keeps the best weights and
stops after ``patience`` epochs without improvement. Seeded: the same call gives the same weights.

Several processes: under ``torchrun`` (``WORLD_SIZE`` > 1) the loop joins the process group (gloo
on CPU, NCCL on GPU), wraps the student in DistributedDataParallel and gives rank ``r`` every
``world``-th batch; the weights stay identical on every rank.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import torch
from torch import nn

from torchkiln.compiler.calibration import ProgressBar, no_progress, tqdm_progress
from torchkiln.compiler.options import option
from torchkiln.compiler.passes import Pass, PassConfig, PassResult, register_pass
from torchkiln.compiler.program import Program, bind_inputs, fresh
from torchkiln.compiler.ranks import join_process_group
from torchkiln.errors import ConfigError, InputError


@dataclasses.dataclass(frozen=True)
class DistillConfig(PassConfig):
    epochs: int = option(10, "passes over the training data")
    temperature: float = option(4.0, "softmax temperature of the distillation loss")
    alpha: float = option(0.9, "weight of the distillation loss against the label loss, in [0, 1]")
    optimizer: Literal["sgd", "adam", "adamw"] = option("adamw", "optimizer")
    lr: float = option(1e-3, "peak learning rate")
    weight_decay: float = option(0.0, "weight decay")
    schedule: Literal["constant", "cosine"] = option("cosine", "learning-rate schedule after warm-up")
    warmup_steps: int = option(0, "steps of linear warm-up")
    patience: int = option(0, "stop after this many epochs without a better validation score (0 = never)")
    seed: int = option(0, "seed for initialisation order and data shuffling")
    group_lasso: float = option(
        0.0, "weight of a group-lasso term: the L2 norm of each prunable channel (its filters in every coupled "
        "layer), summed; whole channels shrink toward zero for a following prune:structured=true (0 = off)",
    )

    def validate(self) -> None:
        if self.epochs < 1:
            self.fail("epochs", f"must be >= 1, got {self.epochs}")
        if self.temperature <= 0:
            self.fail("temperature", f"must be > 0, got {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            self.fail("alpha", f"must be in [0, 1], got {self.alpha}")
        if self.lr <= 0:
            self.fail("lr", f"must be > 0, got {self.lr}")
        for key in ("weight_decay", "warmup_steps", "patience", "group_lasso"):
            if getattr(self, key) < 0:
                self.fail(key, f"must be >= 0, got {getattr(self, key)}")


@dataclasses.dataclass
class DistillResult:
    student: nn.Module
    history: list[dict[str, float]]  # per epoch: train loss, validation score
    best_epoch: int


def distill(
    student: nn.Module,
    teacher: nn.Module | Callable[..., Any],
    train_data: Iterable[Any],
    val_data: Iterable[Any] | None = None,
    config: DistillConfig | None = None,
    progress: bool = True,
    **options: Any,
) -> DistillResult:
    """Train ``student`` toward ``teacher`` (options: see :class:`DistillConfig`); returns the
    student (best validation weights, eval mode) and the per-epoch history."""
    if config is None:
        config = DistillConfig.from_mapping(options, owner="distill")  # type: ignore[assignment]
    elif options:
        raise ConfigError("pass either config or keyword options to distill, not both")
    assert isinstance(config, DistillConfig)
    bar = tqdm_progress if progress else no_progress
    return Trainer(config, bar).fit(student, _caller(student), _caller(teacher), train_data, val_data)


def _caller(model: Any) -> Callable[[Any], Any]:
    def call(inputs: Any) -> Any:
        if isinstance(inputs, dict):
            return model(**inputs)
        return model(*inputs) if isinstance(inputs, (tuple, list)) else model(inputs)

    return call


def split_batch(item: Any) -> tuple[Any, torch.Tensor | None]:
    """``(inputs, integer labels)`` → both; anything else is inputs without labels."""
    if isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[1], torch.Tensor):
        if not item[1].is_floating_point() and item[1].dim() == 1:
            return item[0], item[1]
    return item, None


def first_output(value: Any) -> torch.Tensor:
    from torch.utils import _pytree as pytree

    leaves = [v for v in pytree.tree_leaves(value) if isinstance(v, torch.Tensor) and v.is_floating_point()]
    if not leaves:
        raise InputError("the model returned no floating-point output to distill")
    return leaves[0]


class Trainer:
    def __init__(self, config: DistillConfig, progress: ProgressBar = no_progress):
        self.config, self.progress = config, progress
        self.penalty: Callable[[], torch.Tensor] | None = None

    def fit(
        self,
        student: nn.Module,
        run_student: Callable[[Any], Any],
        run_teacher: Callable[[Any], Any],
        train_data: Iterable[Any],
        val_data: Iterable[Any] | None,
        penalty: Callable[[], torch.Tensor] | None = None,
    ) -> DistillResult:
        """``penalty`` (a term of the parameters, e.g. the group lasso) is added to every step's loss."""
        cfg = self.config
        self.penalty = penalty
        torch.manual_seed(cfg.seed)
        batches = list(train_data)
        if not batches:
            raise InputError("training data for distillation is empty", hint="pass at least one batch")
        rank, world = join_process_group()
        for p in student.parameters():
            if p.is_floating_point():
                p.requires_grad_(True)
        model = _wrap(student, world)
        params = [p for p in student.parameters() if p.requires_grad]
        optimizer = _optimizer(cfg, params)
        steps = cfg.epochs * math.ceil(len(batches[rank::world]) or 1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(cfg, step, steps))
        history, best, best_state, best_epoch, stale = [], -math.inf, None, 0, 0
        call = _caller(model) if model is not student else run_student
        for epoch in range(cfg.epochs):
            order = torch.randperm(len(batches), generator=torch.Generator().manual_seed(cfg.seed + epoch))
            mine = [batches[i] for i in order.tolist()][rank::world]
            loss = self._epoch(model, call, run_teacher, mine, optimizer, scheduler, epoch)
            score = self._validate(student, run_student, run_teacher, val_data) if val_data is not None else -loss
            history.append({"epoch": epoch, "train_loss": loss, "score": score})
            if score > best:
                best, best_state, best_epoch, stale = score, copy.deepcopy(student.state_dict()), epoch, 0
            else:
                stale += 1
                if cfg.patience and stale >= cfg.patience:
                    break
        if best_state is not None and penalty is None:  # a penalty's job is the last epoch's weights (sparser)
            student.load_state_dict(best_state)
        return DistillResult(student.eval(), history, best_epoch if penalty is None else len(history) - 1)

    def _epoch(
        self,
        model: nn.Module,
        call: Callable[[Any], Any],
        run_teacher: Callable[[Any], Any],
        batches: list[Any],
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        epoch: int,
    ) -> float:
        model.train()
        total = 0.0
        for item in self.progress(batches, len(batches), f"distill epoch {epoch + 1}/{self.config.epochs}"):
            inputs, labels = split_batch(item)
            with torch.no_grad():
                target = first_output(run_teacher(inputs)).detach()
            loss = self._loss(first_output(call(inputs)), target, labels)
            if self.penalty is not None:
                loss = loss + self.penalty()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += float(loss.detach())
        return total / max(len(batches), 1)

    def _loss(self, logits: torch.Tensor, target: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        t, alpha = self.config.temperature, self.config.alpha if labels is not None else 1.0
        soft = nn.functional.kl_div(
            nn.functional.log_softmax(logits / t, -1), nn.functional.log_softmax(target / t, -1),
            reduction="batchmean", log_target=True,
        ) * t * t  # fmt: skip
        if labels is None or alpha == 1.0:
            return soft
        return alpha * soft + (1 - alpha) * nn.functional.cross_entropy(logits, labels)

    def _validate(
        self, student: nn.Module, run_student: Callable[[Any], Any], run_teacher: Callable[[Any], Any], data: Iterable[Any]
    ) -> float:
        """Top-1 accuracy (%) when the batches have labels, else minus the distillation loss."""
        student.eval()
        correct = labelled = batches = 0
        loss = 0.0
        with torch.no_grad():
            for item in data:
                inputs, labels = split_batch(item)
                logits = first_output(run_student(inputs))
                if labels is not None:
                    correct, labelled = correct + int((logits.argmax(-1) == labels).sum()), labelled + len(labels)
                else:
                    loss, batches = loss + float(self._loss(logits, first_output(run_teacher(inputs)), None)), batches + 1
        return 100.0 * correct / labelled if labelled else -loss / max(batches, 1)


def _optimizer(cfg: DistillConfig, params: Sequence[torch.Tensor]) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    kind = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return kind(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _lr_factor(cfg: DistillConfig, step: int, total: int) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = (step - cfg.warmup_steps) / max(total - cfg.warmup_steps, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def _wrap(student: nn.Module, world: int) -> nn.Module:
    if world <= 1:
        return student
    return nn.parallel.DistributedDataParallel(student)


@register_pass
class Distill(Pass):
    """Train the graph toward the eager model on ``compile(..., train_data=...)``."""

    name = "distill"
    Config = DistillConfig
    lossless = False
    config: DistillConfig

    def tolerance(self) -> None:
        return None

    def run(self, program: Program) -> PassResult:
        gm = program.graph_module
        lasso, notes = (GroupLasso(program, self.config.group_lasso) if self.config.group_lasso else None), []
        result = train_graph(program, gm, self.config, "distill", lasso)
        last = result.history[-1]
        notes += [f"epoch {h['epoch'] + 1}: train loss {h['train_loss']:.4f}, score {h['score']:.4f}" for h in result.history]
        stats: dict[str, Any] = {"epochs": len(result.history), "best_epoch": result.best_epoch + 1,
                                 "train_loss": round(last["train_loss"], 5)}  # fmt: skip
        if lasso is not None:
            stats |= lasso.summary()
            notes += lasso.notes
        return PassResult(True, stats, notes)


class GroupLasso:
    """``weight · Σ_groups Σ_c ||filters of channel c||₂``: the channels of every group structured
    pruning may shrink (:func:`torchkiln.passes.prune.channel_groups`), each channel's filters taken
    together over the group's producers, so that whole channels go toward zero together. Groups
    pruning would leave alone are not penalized; the notes name them."""

    SMALL = 0.05  # a channel "shrunk": its norm below this share of its group's largest

    def __init__(self, program: Program, weight: float):
        from torchkiln.compiler import graph as G
        from torchkiln.passes.layers import find_layers
        from torchkiln.passes.prune import channel_groups

        gm = program.graph_module
        G.annotate(gm, program.example_inputs)
        layers, self.notes = find_layers(gm)
        groups, _ = channel_groups(gm, layers, (), self.notes)
        self.weight = weight
        self.groups = [[G.get_attr_value(gm, str(p.weight.target)) for p in g.producers] for g in groups]  # type: ignore[union-attr]
        self.channels = sum(g.channels for g in groups)
        if not self.groups:
            raise ConfigError(
                "distill group_lasso: the graph has no channel group structured pruning could shrink",
                where="distill.group_lasso",
                hint="leave group_lasso at 0 for this model (the notes of prune:structured=true say why each layer is frozen)",
            )

    def norms(self, weights: list[torch.Tensor]) -> torch.Tensor:
        return sum(w.reshape(w.shape[0], -1).pow(2).sum(1) for w in weights).clamp(min=1e-12).sqrt()  # type: ignore[union-attr]

    def __call__(self) -> torch.Tensor:
        return self.weight * sum(self.norms(weights).sum() for weights in self.groups)  # type: ignore[return-value]

    def summary(self) -> dict[str, Any]:
        with torch.no_grad():
            small = sum(int((n < self.SMALL * n.max()).sum()) for n in (self.norms(w) for w in self.groups))
        return {"lasso_groups": len(self.groups), "lasso_channels": self.channels, "lasso_shrunk": small}


def train_graph(
    program: Program, gm: nn.Module, config: DistillConfig, what: str, penalty: Callable[[], torch.Tensor] | None = None
) -> DistillResult:
    """Train ``gm`` (the program's graph or a pass's copy of it) toward the eager model on the
    program's training data (``penalty`` added to the loss); its parameters are frozen again afterwards."""
    if program.training is None or program.teacher is None:
        raise InputError(
            f"{what} needs training data", where=what,
            hint="pass train_data=[...] (batches of inputs, or (inputs, labels)) to torchkiln.compile",
        )  # fmt: skip
    specs = program.inputs

    def run_student(inputs: Any) -> Any:
        if isinstance(inputs, dict):
            return gm(*fresh(bind_inputs(specs, (), inputs, program.constants)))
        args = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
        return gm(*fresh(bind_inputs(specs, args, {}, program.constants)))

    trainer = Trainer(config, program.progress or no_progress)
    result = trainer.fit(gm, run_student, _caller(program.teacher), program.training, program.validation, penalty)
    for p in gm.parameters():
        p.requires_grad_(False)
    return result
