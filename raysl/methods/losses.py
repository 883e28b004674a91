"""SSL loss functions: pure, tested numerically against plain reference implementations
(tests/test_losses.py) and across 2 workers on gloo (tests/test_losses_distributed.py).

Distributed convention: every worker calls a loss on its local batch. The mean over
workers of the returned losses is the loss of the global batch, and the gradients match
the single-process gradients after data-parallel averaging (DDP/DeepSpeed take the mean
over workers), because the collectives that carry gradients sum each copy's gradient
back to its owner (see distributed.py). Local batches must have the same size on every
worker. Without torch.distributed every function is the single-process formula.
float16/bfloat16 inputs are computed in float32; float64 stays float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from raysl.methods.distributed import (
    all_reduce_max,
    all_reduce_sum,
    all_reduce_sum_with_grad,
    gather_no_grad,
    gather_with_grad,
    world,
)


def _up(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _positive(**values) -> None:
    for name, v in values.items():
        if not float(v) > 0:
            raise ValueError(f"{name} must be > 0, got {v}")


def _matrix(name: str, x: torch.Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (batch, dim), got shape {tuple(x.shape)}")


def _pair(names: str, a: torch.Tensor, b: torch.Tensor) -> None:
    _matrix(names.split(",")[0], a)
    if a.shape != b.shape:
        raise ValueError(f"{names} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")


# ----------------------------------------------------------------------------- SimCLR


def _nt_xent_terms(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-anchor NT-Xent losses (2B,) of this worker's anchors: view-1 rows, then view-2."""
    _pair("z1, z2", z1, z2)
    _positive(temperature=temperature)
    rank, _ = world()
    b = z1.shape[0]
    local = F.normalize(_up(torch.cat([z1, z2])), dim=1)
    everything = gather_with_grad(local)  # (2B*W, d), worker-major, gradients back to owners
    logits = local @ everything.t() / temperature
    rows = torch.arange(2 * b, device=local.device)
    own = rows + rank * 2 * b
    logits[rows, own] = float("-inf")  # never match yourself
    positive = own + torch.where(rows < b, b, -b)
    return F.cross_entropy(logits, positive, reduction="none")


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's normalized-temperature cross entropy (Chen et al. 2020, "A Simple Framework
    for Contrastive Learning of Visual Representations") over the *global* batch.

    Each worker scores its own 2B anchors against all 2BW candidates gathered (with
    gradients) from every worker; the positive of view-1 of image i is view-2 of image i.
    """
    return _nt_xent_terms(z1, z2, temperature).mean()


def nt_xent_weighted(z1: torch.Tensor, z2: torch.Tensor, temperature: float, weights: torch.Tensor) -> torch.Tensor:
    """NT-Xent with one weight per positive pair, as GenView's quality-driven contrastive
    loss (Li et al. 2024, "GenView: Enhancing View Quality with Pretrained Generative Model
    for Self-Supervised Learning"): loss = sum_a w_a l_a / sum_a w_a over the 2N anchors
    of the global batch, both anchors of pair i weighted by weights[i].

    `weights` (B,) are treated as constants (detached) and normalised to mean 1 over the
    global batch, so equal weights give exactly `nt_xent`.
    """
    if weights.shape != (z1.shape[0],):
        raise ValueError(f"weights must have shape ({z1.shape[0]},) (one per pair), got {tuple(weights.shape)}")
    terms = _nt_xent_terms(z1, z2, temperature)
    w = weights.detach().to(terms.dtype)
    mean = all_reduce_sum(w.sum()) / (w.numel() * world()[1])
    return (terms * (w / mean.clamp_min(torch.finfo(w.dtype).tiny)).repeat(2)).mean()


# ----------------------------------------------------------------------------- MoCo


def info_nce_queue(
    q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float, *, normalize: bool = True
) -> torch.Tensor:
    """MoCo v2 InfoNCE (He et al. 2020, "Momentum Contrast for Unsupervised Visual
    Representation Learning"; Chen et al. 2020, "Improved Baselines with Momentum
    Contrastive Learning"): logits [q.k, q.queue^T] / T, the positive at index 0.

    q (B,d) queries, k (B,d) keys of the momentum encoder, queue (K,d) negatives
    (detached). q, k and the queue are L2-normalised here unless `normalize=False` (for
    the un-normalised outputs of `feature_transform`). k is not detached, so compute it
    under no_grad; FT's mixed keys keep their gradient through q, as in the FT code.
    Purely per-sample: no collective (the method gathers keys for its queue).
    """
    _pair("q, k", q, k)
    _positive(temperature=temperature)
    if queue.dim() != 2 or queue.shape[1] != q.shape[1]:
        raise ValueError(f"queue must have shape (K, {q.shape[1]}), got {tuple(queue.shape)}")
    q = _up(q)
    k, queue = k.to(q.dtype), queue.detach().to(q.dtype)
    if normalize:
        q, k, queue = (F.normalize(t, dim=1) for t in (q, k, queue))
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.t()], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


def moco_v3_loss(q: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo v3 contrastive loss (Chen, Xie, He 2021, "An Empirical Study of Training
    Self-Supervised Vision Transformers"): normalised q (B,d) against the normalised keys
    of all workers (gathered without gradient; k comes from the momentum encoder), labels
    rank*B + arange(B), cross entropy * 2T. Call it for both (q1, k2) and (q2, k1).
    """
    _pair("q, k", q, k)
    _positive(temperature=temperature)
    rank, _ = world()
    q = F.normalize(_up(q), dim=1)
    keys = gather_no_grad(F.normalize(k.detach().to(q.dtype), dim=1))
    labels = torch.arange(q.shape[0], device=q.device) + rank * q.shape[0]
    return F.cross_entropy(q @ keys.t() / temperature, labels) * (2 * temperature)


# ----------------------------------------------------------------------------- BYOL


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL regression loss (Grill et al. 2020, "Bootstrap Your Own Latent"): mean over
    pairs of 2 - 2 cos(p, sg(z)) for online predictions p and target projections z (B,d).
    Symmetrise in the method by adding the loss with the views swapped."""
    _pair("p, z", p, z)
    p = F.normalize(_up(p), dim=-1)
    z = F.normalize(z.detach().to(p.dtype), dim=-1)
    return (2 - 2 * (p * z).sum(-1)).mean()


# ----------------------------------------------------------------------------- SwAV


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, eps: float = 0.05, iters: int = 3) -> torch.Tensor:
    """Sinkhorn-Knopp equipartition of SwAV (Caron et al. 2020, "Unsupervised Learning of
    Visual Features by Contrasting Cluster Assignments"), `distributed_sinkhorn` of the
    SwAV repo: Q = exp(scores/eps)^T (K,B); normalise Q to total 1; `iters` times: each
    prototype row to 1/K (row sums all-reduced over workers), each sample column to 1/B
    (B = global batch); return (B * Q)^T, whose rows sum to 1.

    Scores are shifted by their global max first (a constant factor that the first
    normalisation removes) so exp cannot overflow. No gradient.
    """
    _positive(eps=eps)
    _matrix("scores", scores)
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    s = _up(scores.detach())
    q = torch.exp((s - all_reduce_max(s.max())) / eps).t()
    k, b = q.shape[0], q.shape[1] * world()[1]
    q /= all_reduce_sum(q.sum())
    for _ in range(iters):
        q /= all_reduce_sum(q.sum(dim=1, keepdim=True))
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= b
    return (q * b).t()


def swav_loss(
    scores: list[torch.Tensor],
    crops_for_assign=(0, 1),
    temperature: float = 0.1,
    eps: float = 0.05,
    iters: int = 3,
    queue_scores: list[torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """SwAV swapped prediction (Caron et al. 2020): for each assign crop c, codes
    q_c = sinkhorn([queue_scores ; scores[c]]) restricted to the batch rows (no grad);
    every other view v predicts them: -mean_b sum_k q_c log softmax(scores[v] / T).
    Averaged over the other views, then over the assign crops, as main_swav.py.

    scores[v] (B,K): prototype scores of view v (all views, global crops first);
    queue_scores[i] (Kq,K) or None: scores of the queued embeddings for crop
    crops_for_assign[i], prepended before Sinkhorn as in the SwAV repo.
    """
    _positive(temperature=temperature)
    if len(scores) < 2:
        raise ValueError(f"swav_loss needs at least 2 views, got {len(scores)}")
    for v, s in enumerate(scores):
        _pair(f"scores[{v}], scores[0]", s, scores[0])
    if queue_scores is None:
        queue_scores = [None] * len(crops_for_assign)
    if len(queue_scores) != len(crops_for_assign):
        raise ValueError(
            f"queue_scores needs one entry per assign crop ({len(crops_for_assign)}), got {len(queue_scores)}"
        )
    b, n = scores[0].shape[0], len(scores)
    log_p = [F.log_softmax(_up(s) / temperature, dim=1) for s in scores]
    loss = torch.zeros((), dtype=log_p[0].dtype, device=log_p[0].device)
    for crop, queued in zip(crops_for_assign, queue_scores):
        out = scores[crop].detach()
        if queued is not None:
            out = torch.cat([queued.detach().to(out.dtype), out])
        codes = sinkhorn(out, eps, iters)[-b:].to(log_p[0].dtype)
        loss = loss + torch.stack([-(codes * log_p[v]).sum(1).mean() for v in range(n) if v != crop]).sum() / (n - 1)
    return loss / len(crops_for_assign)


# ----------------------------------------------------------------------------- DINO


def dino_loss(
    student: list[torch.Tensor],
    teacher: list[torch.Tensor],
    center: torch.Tensor,
    student_temp: float,
    teacher_temp: float,
) -> torch.Tensor:
    """DINO cross-entropy (Caron et al. 2021, "Emerging Properties in Self-Supervised
    Vision Transformers"): for every teacher crop i (global crops, no grad) and every
    student crop v != i, -sum softmax((t_i - center)/teacher_temp) * log_softmax(s_v /
    student_temp), mean over the batch, then mean over the pairs. student[i] and teacher[i]
    must be the same global crop for i < len(teacher)."""
    _positive(student_temp=student_temp, teacher_temp=teacher_temp)
    if len(student) < 2 or not 1 <= len(teacher) <= len(student):
        raise ValueError(
            f"dino_loss needs >= 2 student crops and 1..{len(student)} teacher crops, "
            f"got {len(student)} and {len(teacher)}"
        )
    for name, crops in (("student", student), ("teacher", teacher)):
        for i, x in enumerate(crops):
            _pair(f"{name}[{i}], student[0]", x, student[0])
    log_s = [F.log_softmax(_up(s) / student_temp, dim=-1) for s in student]
    t = [F.softmax((_up(x.detach()) - center.to(log_s[0].dtype)) / teacher_temp, dim=-1) for x in teacher]
    terms = [-(t[i] * log_s[v]).sum(-1).mean() for i in range(len(t)) for v in range(len(log_s)) if v != i]
    return torch.stack(terms).mean()


@torch.no_grad()
def dino_center_update(center: torch.Tensor, teacher: list[torch.Tensor], momentum: float) -> torch.Tensor:
    """DINO center EMA (Caron et al. 2021): center * m + mean(teacher logits) * (1 - m),
    the mean over every global crop of the GLOBAL batch (sum all-reduced). Returns a new
    tensor shaped like `center` ((K,) or (1,K)); copy it into the buffer."""
    if not 0.0 <= float(momentum) <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    t = torch.cat([_up(x.detach()) for x in teacher])
    if t.shape[-1] != center.shape[-1]:
        raise ValueError(f"center has {center.shape[-1]} dims, teacher logits {t.shape[-1]}")
    batch_center = all_reduce_sum(t.sum(0)) / (t.shape[0] * world()[1])
    return center * momentum + batch_center.reshape(center.shape).to(center.dtype) * (1 - momentum)


# ----------------------------------------------------------------------------- Barlow Twins, VICReg


def barlow_twins_loss(z1: torch.Tensor, z2: torch.Tensor, lambd: float = 0.0051) -> torch.Tensor:
    """Barlow Twins (Zbontar et al. 2021, "Self-Supervised Learning via Redundancy
    Reduction"): c = BN(z1)^T BN(z2) / N with BN over the global batch (affine-free,
    biased variance, eps 1e-5, as the official SyncBatchNorm); loss = sum_i (1 - c_ii)^2 +
    lambd * sum_{i!=j} c_ij^2.

    The batch statistics and c are summed over workers WITH gradient, so every worker
    holds the global loss and the averaged gradients are exact (the official code's
    no-grad all_reduce of c scales gradients by 1/world_size).
    """
    _pair("z1, z2", z1, z2)
    z = _up(torch.stack([z1, z2]))  # (2, B, d)
    n = z.shape[1] * world()[1]
    mean = all_reduce_sum_with_grad(z.sum(1, keepdim=True)) / n
    var = all_reduce_sum_with_grad((z - mean).pow(2).sum(1, keepdim=True)) / n
    z = (z - mean) / torch.sqrt(var + 1e-5)
    c = all_reduce_sum_with_grad(z[0].t() @ z[1]) / n
    diag = torch.diagonal(c)
    off = ~torch.eye(c.shape[0], dtype=torch.bool, device=c.device)
    return (diag - 1).pow(2).sum() + lambd * c[off].pow(2).sum()


def vicreg_loss(
    z1: torch.Tensor, z2: torch.Tensor, sim_coeff: float = 25.0, std_coeff: float = 25.0, cov_coeff: float = 1.0
) -> tuple[torch.Tensor, dict]:
    """VICReg (Bardes, Ponce, LeCun 2022, "VICReg: Variance-Invariance-Covariance
    Regularization"), as the official code: invariance = MSE of the local pairs; the
    embeddings are gathered with gradient, centred, variance = mean relu(1 - sqrt(var +
    1e-4)) averaged over the two branches, covariance = sum of squared off-diagonal
    covariances (unbiased, global N) / d summed over the two branches.
    Returns (loss, {"invariance", "variance", "covariance"}) with the unweighted terms."""
    _pair("z1, z2", z1, z2)
    x, y = _up(z1), _up(z2)
    invariance = F.mse_loss(x, y)
    both = gather_with_grad(torch.cat([x, y], dim=1))  # one collective for both branches
    x, y = both[:, : x.shape[1]], both[:, x.shape[1] :]
    n, d = x.shape
    if n < 2:
        raise ValueError("vicreg_loss needs a global batch of at least 2")
    x, y = x - x.mean(0), y - y.mean(0)
    variance = F.relu(1 - torch.sqrt(x.var(0) + 1e-4)).mean() / 2 + F.relu(1 - torch.sqrt(y.var(0) + 1e-4)).mean() / 2
    off = ~torch.eye(d, dtype=torch.bool, device=x.device)
    covariance = ((x.t() @ x / (n - 1))[off].pow(2).sum() + (y.t() @ y / (n - 1))[off].pow(2).sum()) / d
    loss = sim_coeff * invariance + std_coeff * variance + cov_coeff * covariance
    return loss, {"invariance": invariance, "variance": variance, "covariance": covariance}


# ----------------------------------------------------------------------------- MAE


def mae_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix: bool = True) -> torch.Tensor:
    """MAE reconstruction loss (He et al. 2022, "Masked Autoencoders Are Scalable Vision
    Learners"): per-patch MSE between pred and target (B, L, p*p*3), the target normalised
    per patch ((x - mean) / sqrt(var + 1e-6), unbiased var) when norm_pix; mean over the
    masked patches (mask (B, L), 1 = masked). Local; with the same mask ratio on every
    worker the mean over workers is the global mean."""
    if pred.dim() != 3 or pred.shape != target.shape:
        raise ValueError(
            f"pred and target must be (B, L, D) of the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}"
        )
    if mask.shape != pred.shape[:2]:
        raise ValueError(f"mask must have shape {tuple(pred.shape[:2])}, got {tuple(mask.shape)}")
    pred = _up(pred)
    target = target.detach().to(pred.dtype)
    if norm_pix:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    per_patch = (pred - target).pow(2).mean(-1)
    mask = mask.to(per_patch.dtype)
    return (per_patch * mask).sum() / mask.sum().clamp_min(1)


# ----------------------------------------------------------------------------- FT


def _beta(alpha: float, generator: torch.Generator | None) -> float:
    """One sample of Beta(alpha, alpha), reproducible from `generator` (CPU) when given."""
    beta = torch.distributions.Beta(torch.tensor(float(alpha)), torch.tensor(float(alpha)))
    if generator is None:
        return float(beta.sample())
    seed = int(torch.randint(2**62, (), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return float(beta.sample())


def feature_transform(
    q: torch.Tensor,
    k: torch.Tensor,
    negatives: torch.Tensor,
    *,
    extrapolate: float | None = 2.0,
    interpolate: float | None = 1.6,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Feature transformation FT (Zhu, Zhao, Liu, Sun, Chen, ICCV 2021, "Improving
    Contrastive Learning by Visualizing Feature Transformation"), as the paper and its
    released code (mem_moco.py, run with --mixnorm_target posneg --expolation_mask
    --sep_alpha --pos_alpha 2.0 --neg_alpha 1.6 --mask_distribution beta):

    q, k (B,d) and negatives (N,d) are L2-normalised, then
      positive extrapolation, lam_ex = 1 + Beta(a_ex, a_ex) in [1, 2]:
          q' = lam_ex * q + (1 - lam_ex) * k,   k' = lam_ex * k + (1 - lam_ex) * q
        (both ends pushed apart along q - k: harder positives, q'.k' <= q.k)
      negative interpolation, lam_in = Beta(a_in, a_in) in [0, 1], pi a random permutation:
          n'_j = lam_in * n_j + (1 - lam_in) * n_pi(j)
        (mixes of the queue replace it: more diverse negatives)
    with one lam of each kind per call. Outputs are NOT re-normalised (the released recipe
    has no --postmix_norm): score them with info_nce_queue(q', k', n', T, normalize=False)
    and enqueue the ORIGINAL keys. negatives are detached; q' and k' carry q's gradient.

    extrapolate / interpolate: the Beta concentrations a_ex / a_in; None skips that part.
    generator: a CPU torch.Generator for reproducible lam and permutation.
    Returns (q', k', negatives').
    """
    _pair("q, k", q, k)
    if negatives.dim() != 2 or negatives.shape[1] != q.shape[1]:
        raise ValueError(f"negatives must have shape (N, {q.shape[1]}), got {tuple(negatives.shape)}")
    for name, a in (("extrapolate", extrapolate), ("interpolate", interpolate)):
        if a is not None:
            _positive(**{name: a})
    q = F.normalize(_up(q), dim=1)
    k = F.normalize(k.to(q.dtype), dim=1)
    n = F.normalize(negatives.detach().to(q.dtype), dim=1)
    if extrapolate is not None:
        lam = 1.0 + _beta(extrapolate, generator)
        q, k = lam * q + (1 - lam) * k, lam * k + (1 - lam) * q
    if interpolate is not None:
        lam = _beta(interpolate, generator)
        perm = torch.randperm(n.shape[0], generator=generator).to(n.device)
        n = lam * n + (1 - lam) * n[perm]
    return q, k, n


@torch.no_grad()
def pos_neg_scores(q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine scores for the positive/negative histograms of FT (Zhu et al. 2021): the
    positives q_i.k_i (B,) and all negatives q_i.n_j flattened (B*N,), row-major. No grad."""
    _pair("q, k", q, k)
    if negatives.dim() != 2 or negatives.shape[1] != q.shape[1]:
        raise ValueError(f"negatives must have shape (N, {q.shape[1]}), got {tuple(negatives.shape)}")
    q, k, n = (F.normalize(_up(t.detach()), dim=1) for t in (q, k, negatives))
    return (q * k).sum(1), (q @ n.to(q.dtype).t()).flatten()
