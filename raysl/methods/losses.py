"""SSL loss functions: pure, tested numerically against plain reference implementations
(tests/unit/test_losses.py) and across 2 workers on gloo (tests/integration/test_losses_distributed.py).

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


def _tokens(pred: torch.Tensor, target: torch.Tensor, name: str, per_token: torch.Tensor, shape: str) -> None:
    """pred and target (B, tokens, D) alike, and one `name` entry per token."""
    if pred.dim() != 3 or pred.shape != target.shape:
        raise ValueError(
            f"pred and target must be {shape} of the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}"
        )
    if per_token.shape != pred.shape[:2]:
        raise ValueError(f"{name} must have shape {tuple(pred.shape[:2])}, got {tuple(per_token.shape)}")


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
def sinkhorn(scores: torch.Tensor, eps: float = 0.05, iters: int = 3, *, equal_rows: bool = True) -> torch.Tensor:
    """Sinkhorn-Knopp equipartition of SwAV (Caron et al. 2020, "Unsupervised Learning of
    Visual Features by Contrasting Cluster Assignments"), `distributed_sinkhorn` of the
    SwAV repo: Q = exp(scores/eps)^T (K,B); normalise Q to total 1; `iters` times: each
    prototype row to 1/K (row sums all-reduced over workers), each sample column to 1/B
    (B = global batch); return (B * Q)^T, whose rows sum to 1.

    Scores are shifted by their global max first (a constant factor that the first
    normalisation removes) so exp cannot overflow. No gradient.

    `equal_rows=False`: workers may hold different numbers of rows (DINOv2's masked patch
    tokens), so B is all-reduced instead of rows x world size; a worker may hold none.

    DINOv2 (Oquab et al. 2023) centres its teacher with this same algorithm at eps =
    teacher temperature (`SinkhornKnoppTeacher`), in place of DINO's running centre.
    """
    _positive(eps=eps)
    _matrix("scores", scores)
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    s = _up(scores.detach())
    top = s.max() if s.numel() else torch.tensor(float("-inf"), dtype=s.dtype, device=s.device)
    q = torch.exp((s - all_reduce_max(top)) / eps).t()
    k = q.shape[0]
    b = q.shape[1] * world()[1] if equal_rows else all_reduce_sum(torch.tensor(float(q.shape[1]), device=s.device))
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
    _positive(teacher_temp=teacher_temp)
    dtype = _up(student[0]).dtype
    t = [F.softmax((_up(x.detach()).to(dtype) - center.to(dtype)) / teacher_temp, dim=-1) for x in teacher]
    return self_distillation_loss(student, t, student_temp)


def self_distillation_loss(student: list[torch.Tensor], teacher_probs: list[torch.Tensor], student_temp: float):
    """DINO's cross-entropy with the teacher's probabilities already made (DINO: centred and
    sharpened softmax; DINOv2: Sinkhorn-Knopp): for every teacher crop i and student crop
    v != i, -sum t_i * log_softmax(s_v / student_temp), mean over the batch, then over the
    pairs. Local: the mean over workers is the global batch's."""
    _positive(student_temp=student_temp)
    if len(student) < 2 or not 1 <= len(teacher_probs) <= len(student):
        raise ValueError(
            f"the DINO loss needs >= 2 student crops and 1..{len(student)} teacher crops, "
            f"got {len(student)} and {len(teacher_probs)}"
        )
    for name, crops in (("student", student), ("teacher", teacher_probs)):
        for i, x in enumerate(crops):
            _pair(f"{name}[{i}], student[0]", x, student[0])
    log_s = [F.log_softmax(_up(s) / student_temp, dim=-1) for s in student]
    t = [p.detach().to(log_s[0].dtype) for p in teacher_probs]
    terms = [-(t[i] * log_s[v]).sum(-1).mean() for i in range(len(t)) for v in range(len(log_s)) if v != i]
    return torch.stack(terms).mean()


def masked_patch_loss(
    student: torch.Tensor, teacher_probs: torch.Tensor, masks: torch.Tensor, student_temp: float
) -> torch.Tensor:
    """iBOT's masked image modelling loss (Zhou et al. 2022, "iBOT: Image BERT Pre-Training
    with Online Tokenizer"), as DINOv2's `iBOTPatchLoss.forward_masked`: the student's
    logits of its masked patches predict the teacher's probabilities for the same patches
    of the unmasked image. Per image: the mean over its masked patches of
    -sum t * log_softmax(s / student_temp); then the mean over ALL images, an image with
    no masked patch counting 0 (as both papers' code does).

    student, teacher_probs (M, K): the masked patches of every image, image-major (the
    order of `masks.nonzero()`); masks (I, L) bool, I images (crops) of L patches.
    Local: with the same I on every worker, the mean over workers is the global one."""
    _positive(student_temp=student_temp)
    _pair("student, teacher_probs", student, teacher_probs)
    if masks.dim() != 2 or int(masks.sum()) != student.shape[0]:
        raise ValueError(
            f"masks must be (images, patches) with one True per student row ({student.shape[0]}), "
            f"got shape {tuple(masks.shape)} with {int(masks.sum())} True"
        )
    log_s = F.log_softmax(_up(student) / student_temp, dim=-1)
    per_patch = -(teacher_probs.detach().to(log_s.dtype) * log_s).sum(-1)
    counts = masks.sum(1)
    weights = (1.0 / counts.clamp_min(1).to(per_patch.dtype)).repeat_interleave(counts)
    return (per_patch * weights).sum() / masks.shape[0]


def koleo_loss(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KoLeo regulariser (Sablayrolles et al. 2019, "Spreading vectors for similarity
    search"; DINOv2 `KoLeoLoss`): L2-normalise, find each row's nearest other row (largest
    dot product, no gradient), and return -mean log(||x_i - x_nn(i)|| + eps) (the distance
    as torch's pairwise_distance with eps=eps).

    Over the GLOBAL batch: each worker's rows look for their neighbour among every
    worker's rows (gathered with gradients, so a neighbour's gradient returns to its
    owner). DINOv2 searches within each GPU's batch only; the global batch makes the loss
    independent of how the batch is split."""
    _matrix("x", x)
    rank, _ = world()
    local = F.normalize(_up(x), dim=-1, eps=eps)
    everything = gather_with_grad(local)
    if everything.shape[0] < 2:
        raise ValueError("koleo_loss needs a global batch of at least 2")
    with torch.no_grad():
        dots = local @ everything.t()
        rows = torch.arange(local.shape[0], device=local.device)
        dots[rows, rows + rank * local.shape[0]] = float("-inf")
        nearest = dots.argmax(dim=1)
    distance = F.pairwise_distance(local, everything[nearest], p=2, eps=eps)
    return -torch.log(distance + eps).mean()


def masked_regression_loss(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """I-JEPA's loss (Assran et al. 2023, "Self-Supervised Learning from Images with a
    Joint-Embedding Predictive Architecture"; `F.smooth_l1_loss` in its train.py): smooth
    L1 between predicted and target patch representations, the mean over every element of
    every valid token of the GLOBAL batch. pred, target (B, T, D); valid (B, T) bool marks
    real tokens (the rest is padding: images have different numbers of target patches).

    Each worker returns world_size x its sum / the global element count, so the mean over
    workers is the global mean whatever the workers' token counts."""
    _tokens(pred, target, "valid", valid, "(B, T, D)")
    pred = _up(pred)
    per_token = F.smooth_l1_loss(pred, target.detach().to(pred.dtype), reduction="none").sum(-1)
    total = per_token[valid].sum()
    n = all_reduce_sum(valid.sum().to(pred.dtype)) * pred.shape[-1]
    return total * world()[1] / n.clamp_min(1)


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
    _tokens(pred, target, "mask", mask, "(B, L, D)")
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
