"""The maths of Parseval networks (Cissé et al., ICML 2017) as plain torch functions, with no Lightning in sight.

A Parseval layer keeps its weight a Parseval tight frame: W Wᵀ = I, so ‖W‖₂ = 1 and the layer is 1-Lipschitz.
Training keeps it near that set with one cheap step after every optimiser step (the "retraction"),

    W ← (1 + β) W − β W Wᵀ W,

which moves every singular value s by s ← (1+β)s − βs³ (fixed point 1) and leaves the singular vectors alone.
Three reproductions agree on it (DingJianhao/parseval-network-pytorch, Ivan1248/Parseval-networks, mathialo/parsnet;
no official code exists; see shared/reference/methods.md §5).

Convolutions. A conv weight (out, in, kh, kw) is the matrix W of shape (out, in·kh·kw) applied to every patch, and
‖conv‖₂ ≤ √(kh·kw)·‖W‖₂ (each input pixel lies in at most kh·kw patches; fewer with a stride, so the bound is
conservative there). Ivan1248 divides conv outputs by the kernel size for this reason ("h / ksize"). We cannot change
the models' forward, so the same scaling is put into the weight: the retraction orthonormalises M = √(kh·kw)·W, i.e.
a conv sits at the fixed point when its weight is an orthonormal-row matrix divided by √(kh·kw), which makes the conv
1-Lipschitz. In terms of W the step is W ← (1+β)W − β·kh·kw·W Wᵀ W. `conv_scaling=False` gives the unscaled step of
DingJianhao and parsnet.

Tall matrices (more rows than columns: e.g. a first conv with 16 filters of 1·4·4 = 16 or fewer inputs) cannot have
orthonormal rows. The same step then drives them to orthonormal *columns* (WᵀW = I), which still means ‖W‖₂ = 1, and
`orthonormality_error` measures ‖WᵀW − I‖ for them: the Gram matrix of the smaller side.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import nn

#: layer types the retraction understands: a Linear, or a convolution whose weight is (out, in, *kernel).
PARSEVAL_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def conv_scale(weight: torch.Tensor, conv_scaling: bool = True) -> float:
    """√(kernel size): the scale applied to a conv's matrix view before it is orthonormalised (1 for Linear)."""
    if weight.dim() < 2:
        raise ValueError(f"a Parseval weight needs at least 2 dimensions, got shape {tuple(weight.shape)}")
    if not conv_scaling or weight.dim() == 2:
        return 1.0
    return math.sqrt(math.prod(weight.shape[2:]))


def _scaled_matrix(weight: torch.Tensor, conv_scaling: bool) -> tuple[torch.Tensor, float]:
    """The weight as an (out, rest) float matrix times its conv scale (a copy), and that scale."""
    c = conv_scale(weight, conv_scaling)
    m = weight.detach().reshape(weight.shape[0], -1)
    m = m.float() if m.dtype in (torch.float16, torch.bfloat16) else m.clone()
    return m * c if c != 1.0 else m, c


def _retract(m: torch.Tensor, beta: float) -> torch.Tensor:
    # (1+β)M − β M (MᵀM) for tall M and (1+β)M − β (MMᵀ) M for wide M: the same map, the smaller Gram matrix.
    gram_term = m @ (m.T @ m) if m.shape[0] > m.shape[1] else (m @ m.T) @ m
    return (1 + beta) * m - beta * gram_term


def parseval_retraction_(weight: torch.Tensor, beta: float, sample_rows: float | None = None,
                         generator: torch.Generator | None = None, *, conv_scaling: bool = True) -> torch.Tensor:
    """One retraction step W ← (1+β)W − βWWᵀW on a Linear or conv weight, in place; returns `weight`.

    Args:
        weight: (out, in) or (out, in, *kernel); convs are reshaped to (out, in·∏kernel) and scaled (module docstring).
        beta: the retraction rate, 0 <= β < 1 (β = 0 is the identity). Singular values above √((2+β)/β) diverge.
        sample_rows: None for all rows, or a fraction in (0, 1]: a random subset of ⌊fraction·out⌋ rows (at least
            one) is orthonormalised among itself, the other rows are left exactly as they are (DingJianhao samples
            30% of the rows of large Linear layers to save time).
        generator: the random source for the row sample (CPU generator).
        conv_scaling: orthonormalise √(kh·kw)·W for convs, so the conv (not just its matrix) is 1-Lipschitz.
    """
    if not 0 <= beta < 1:
        raise ValueError(f"beta={beta} must be in [0, 1): the retraction rate (3e-4 in Ivan1248's reproduction)")
    if sample_rows is not None and not 0 < sample_rows <= 1:
        raise ValueError(f"sample_rows={sample_rows} must be None (all rows) or a fraction in (0, 1]")
    if beta == 0:
        return weight
    with torch.no_grad():
        m, c = _scaled_matrix(weight, conv_scaling)
        out_rows = m.shape[0]
        if sample_rows is None or sample_rows == 1:
            m = _retract(m, beta)
        else:
            n = max(1, int(sample_rows * out_rows))
            rows = torch.randperm(out_rows, generator=generator)[:n].to(m.device)
            m[rows] = _retract(m[rows], beta)
        if c != 1.0:
            m = m / c
        weight.detach().copy_(m.reshape(weight.shape))
    return weight


def orthonormality_error(weight: torch.Tensor, *, conv_scaling: bool = True) -> float:
    """‖WWᵀ − I‖_F for a wide (or square) weight, ‖WᵀW − I‖_F for a tall one; convs scaled as the retraction does.

    0 exactly at the retraction's fixed point, for every layer shape."""
    with torch.no_grad():
        m, _ = _scaled_matrix(weight, conv_scaling)
        gram = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
        eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        return float(torch.linalg.matrix_norm(gram - eye))


def project_to_simplex(v: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of each vector along the last dimension onto the probability simplex {α ≥ 0, Σα = 1}.

    The sort-based algorithm (Held et al. 1974; Duchi et al. 2008), as in DingJianhao's `convex_constraint`: sort
    descending, ρ = the largest k with 1 + k·u_k > Σ_{r≤k} u_r, τ = (Σ_{r≤ρ} u_r − 1)/ρ, α = max(v − τ, 0).
    Batches of vectors are fine: shape (..., n) in, the same shape out (a new tensor)."""
    if v.dim() == 0 or v.shape[-1] == 0:
        raise ValueError(f"project_to_simplex needs vectors of length >= 1, got shape {tuple(v.shape)}")
    if not v.is_floating_point():
        v = v.float()
    if not torch.isfinite(v).all():
        raise ValueError("project_to_simplex got non-finite values")
    u, _ = torch.sort(v, dim=-1, descending=True)
    css = u.cumsum(-1)
    k = torch.arange(1, v.shape[-1] + 1, dtype=v.dtype, device=v.device)
    support = (1 + k * u) > css  # true exactly for k = 1..ρ (k = 1 always holds)
    rho = (support * k).amax(-1, keepdim=True)
    tau = (css.gather(-1, rho.long() - 1) - 1) / rho
    return (v - tau).clamp_min(0)


def orthogonal_init_(module: nn.Module, *, conv_scaling: bool = True) -> nn.Module:
    """`nn.init.orthogonal_` on every Linear/conv weight in `module` (itself included), conv weights divided by
    √(kernel size), so each layer starts at the retraction's fixed point. Biases are left as they are."""
    for layer in module.modules():
        if isinstance(layer, PARSEVAL_LAYERS):
            with torch.no_grad():
                nn.init.orthogonal_(layer.weight)
                c = conv_scale(layer.weight, conv_scaling)
                if c != 1.0:
                    layer.weight.div_(c)
    return module


class ConvexCombination(nn.Module):
    """y = Σᵢ αᵢ·xᵢ with α on the probability simplex: the Parseval replacement of a residual sum x + f(x).

    A plain sum of two 1-Lipschitz branches is only 2-Lipschitz; a convex combination stays 1-Lipschitz. The weights
    are trained like any parameter and put back on the simplex by `project_()` after each optimiser step
    (ParsevalTraining does this for every ConvexCombination in the model). Init 1/n as DingJianhao's; Ivan1248
    starts a two-branch block at 0.99 on the shortcut: pass `init=(0.99, 0.01)` for that.
    """

    def __init__(self, n: int = 2, init: Sequence[float] | None = None):
        super().__init__()
        if n < 1:
            raise ValueError(f"a ConvexCombination needs n >= 1 branches, got {n}")
        start = torch.full((n,), 1.0 / n) if init is None else torch.as_tensor(init, dtype=torch.float32)
        if start.shape != (n,):
            raise ValueError(f"init has {start.numel()} weights for {n} branches")
        self.n = n
        self.weight = nn.Parameter(project_to_simplex(start))

    def forward(self, *branches: torch.Tensor) -> torch.Tensor:
        if len(branches) != self.n:
            raise ValueError(f"ConvexCombination({self.n}) got {len(branches)} inputs")
        return sum(a * x for a, x in zip(self.weight, branches))

    def project_(self) -> None:
        with torch.no_grad():
            self.weight.copy_(project_to_simplex(self.weight))


def project_convex_combinations_(modules: Iterable[nn.Module]) -> int:
    """Put every ConvexCombination among `modules` back on the simplex; returns how many there were."""
    count = 0
    for m in modules:
        if isinstance(m, ConvexCombination):
            m.project_()
            count += 1
    return count
