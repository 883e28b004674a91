"""Full fine-tuning of a pretrained backbone (the recipe the MAE-for-medical-images study
found decisive): a fresh timm classifier head, layer-wise lr decay
(`timm.optim.param_groups_layer_decay`), DropPath (the backbone is built with
`drop_path_rate`), RandAugment (torchvision v2, per image), mixup/cutmix with label
smoothing (`timm.data.Mixup` + SoftTargetCrossEntropy), AdamW with warmup + cosine,
trained data-parallel through a DeepSpeed engine on the Ray Train workers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from raysl.data.views import normalize
from raysl.eval.supervised import accuracy, engine_config, epoch_batches, per_worker_batch
from raysl.optim.schedules import apply, cosine, scaled_lr
from raysl.train.build import worker_seed
from raysl.train.engine import initialize

if TYPE_CHECKING:
    from raysl.models.backbone import TimmModel


@dataclass
class FinetuneOptions:
    epochs: int = 10
    lr: float = 1e-3  # per 256 images (scaled to the global batch)
    layer_decay: float = 0.75
    drop_path: float = 0.1
    mixup: float = 0.8  # Beta alpha; 0: off
    cutmix: float = 1.0  # Beta alpha; 0: off
    smoothing: float = 0.1
    weight_decay: float = 0.05
    warmup_epochs: int = 1
    batch_size: int = 64  # per worker
    randaug_ops: int = 2
    randaug_magnitude: int = 9
    seed: int = 0


def augment(images: torch.Tensor, randaug, generator: torch.Generator) -> torch.Tensor:
    """RandAugment each uint8 image on its own, then a random horizontal flip."""
    out = torch.stack([randaug(img) for img in images])
    flip = torch.rand(len(out), generator=generator) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


def finetune(backbone: TimmModel, train_x, train_y, val_x, val_y, opts: FinetuneOptions) -> dict:
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy
    from timm.optim import param_groups_layer_decay
    from torchvision.transforms import v2

    from raysl.eval.supervised import world

    classes = int(max(train_y.max(), val_y.max())) + 1
    torch.manual_seed(opts.seed)  # the same new head on every worker
    backbone.reset_classifier(classes)
    no_decay = backbone.no_weight_decay() if hasattr(backbone, "no_weight_decay") else ()
    groups = param_groups_layer_decay(
        backbone, weight_decay=opts.weight_decay, layer_decay=opts.layer_decay, no_weight_decay_list=no_decay
    )
    optimizer = torch.optim.AdamW(groups, lr=opts.lr)
    mixing = opts.mixup > 0 or opts.cutmix > 0
    bs = per_worker_batch(len(train_y), opts.batch_size, even=mixing)
    engine = initialize(backbone, optimizer, engine_config(bs))
    rank, size = world()
    mixup = (
        Mixup(mixup_alpha=opts.mixup, cutmix_alpha=opts.cutmix, label_smoothing=opts.smoothing, num_classes=classes)
        if mixing
        else None
    )
    criterion = SoftTargetCrossEntropy() if mixing else torch.nn.CrossEntropyLoss(label_smoothing=opts.smoothing)
    randaug = v2.RandAugment(num_ops=opts.randaug_ops, magnitude=opts.randaug_magnitude)
    torch.manual_seed(worker_seed(opts.seed, rank))  # per-worker augmentation, mixing and DropPath
    generator = torch.Generator().manual_seed(worker_seed(opts.seed, rank))

    steps_per_epoch = len(epoch_batches(len(train_y), bs, seed=opts.seed, epoch=0))
    total = max(1, opts.epochs * steps_per_epoch)
    lr = cosine(scaled_lr(opts.lr, bs * size), 1e-6, total, min(opts.warmup_epochs * steps_per_epoch, total - 1))
    device = next(backbone.parameters()).device
    history, step = [], 0
    for epoch in range(opts.epochs):
        backbone.train()
        losses = []
        for idx in epoch_batches(len(train_y), bs, seed=opts.seed, epoch=epoch):
            apply(optimizer, {"lr": float(lr[step])})  # times each group's layer-decay lr_scale
            x = normalize(augment(train_x[idx], randaug, generator).to(device))
            y = train_y[idx].to(device)
            if mixup:
                x, y = mixup(x, y)
            loss = criterion(engine(x), y)
            engine.backward(loss)
            engine.step()
            losses.append(float(loss.detach()))
            step += 1
        backbone.eval()
        top1 = accuracy(lambda i: backbone(normalize(val_x[i].to(device))), len(val_y), val_y)
        history.append({"epoch": epoch + 1, "loss": sum(losses) / max(len(losses), 1), "val_top1": top1})
    return {
        "top1": history[-1]["val_top1"] if history else None,
        "best_top1": max((h["val_top1"] for h in history), default=None),
        "history": history,
        "steps": step,
        "options": vars(opts),
    }
