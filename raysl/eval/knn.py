"""Weighted k-nearest-neighbour evaluation of frozen features (Wu et al. 2018, as DINO's
eval_knn.py): cosine similarity, the top k neighbours vote with weight exp(sim / T)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from raysl.data.views import normalize
from raysl.progress import bar


@torch.no_grad()
def extract_features(
    backbone: torch.nn.Module, images_uint8: torch.Tensor, batch_size: int = 256, progress: str | None = None
) -> torch.Tensor:
    """L2-normalised pooled features (N, D) of uint8 images (N, 3, H, W) already at the
    evaluation size: ImageNet-normalised as in training (`views.normalize`), backbone in
    eval mode (its mode is restored afterwards), on the backbone's device, returned on CPU.
    With `progress` (its description), a progress bar of the images done."""
    if images_uint8.dtype != torch.uint8 or images_uint8.dim() != 4:
        raise ValueError(f"images must be uint8 (N, 3, H, W), got {images_uint8.dtype} {tuple(images_uint8.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    was_training = backbone.training
    backbone.eval()
    try:
        param = next(backbone.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        feats = []
        with bar(images_uint8.shape[0], progress, disable=progress is None) as done:
            for i in range(0, images_uint8.shape[0], batch_size):
                x = normalize(images_uint8[i : i + batch_size].to(device)).to(dtype)
                f = backbone(x)
                if f.dim() > 2:  # a backbone that returns a map: global average pool
                    f = f.flatten(2).mean(-1)
                feats.append(F.normalize(f.float(), dim=1).cpu())
                done.update(x.shape[0])
        return torch.cat(feats) if feats else torch.zeros(0, 0)
    finally:
        backbone.train(was_training)


@torch.no_grad()
def knn_top1(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    *,
    chunk: int = 1024,
) -> tuple[float, float]:
    """Weighted cosine kNN classifier (DINO): for each test feature the k most similar
    train features (cosine; features are L2-normalised here) vote for their label with
    weight exp(similarity / temperature); the class with the largest summed weight wins.
    Returns (top-1, top-5) accuracy in percent; top-5 counts the true label among the
    min(5, number of classes) best-voted classes."""
    if train_feats.shape[0] != train_labels.shape[0] or test_feats.shape[0] != test_labels.shape[0]:
        raise ValueError("features and labels must have the same number of rows")
    if train_feats.shape[0] == 0 or test_feats.shape[0] == 0:
        raise ValueError("knn_top1 needs at least one train and one test feature")
    if temperature <= 0 or k < 1:
        raise ValueError(f"need k >= 1 and temperature > 0, got k={k}, temperature={temperature}")
    train = F.normalize(train_feats.float(), dim=1)
    test = F.normalize(test_feats.float(), dim=1)
    train_labels = train_labels.long()
    test_labels = test_labels.long()
    classes = int(max(train_labels.max(), test_labels.max())) + 1
    k = min(k, train.shape[0])
    top5_n = min(5, classes)
    correct1 = correct5 = 0
    for i in range(0, test.shape[0], chunk):
        sim = test[i : i + chunk] @ train.t()  # (n, N)
        top_sim, top_idx = sim.topk(k, dim=1)
        votes = torch.zeros(sim.shape[0], classes)
        votes.scatter_add_(1, train_labels[top_idx], (top_sim / temperature).exp())
        ranked = votes.argsort(dim=1, descending=True)
        truth = test_labels[i : i + chunk].unsqueeze(1)
        correct1 += int((ranked[:, :1] == truth).any(1).sum())
        correct5 += int((ranked[:, :top5_n] == truth).any(1).sum())
    n = test.shape[0]
    return 100.0 * correct1 / n, 100.0 * correct5 / n
