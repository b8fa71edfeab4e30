"""Attacks: threat model (ε-ball, [0, 1]), model state left untouched, loss goes the right way, closed forms on a
linear model, equivalences between attacks, argument checking, and exact agreement with torchattacks.

Everything runs on tiny models built here (a 2-conv CNN with BatchNorm and Dropout, a linear-softmax model) with
fixed seeds, in float64 wherever results are compared exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robust_train.attacks import ATTACKS, BIM, FGSM, MIM, PGD, RandFGSM, attack_loss, create_attack
from robust_train.errors import ConfigError

NUM_CLASSES = 3


# --------------------------------------------------------------------------------------------------- fixtures
pytestmark = pytest.mark.usefixtures("one_thread")


class TinyCNN(nn.Module):
    """conv-BN-ReLU, strided conv-ReLU, global average pool, dropout, linear: 1x8x8 -> 3 logits."""

    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.drop = nn.Dropout(0.25)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv1(x)))
        h = torch.relu(self.conv2(h))
        return self.fc(self.drop(h.mean(dim=(2, 3))))


def linear_model(weight: torch.Tensor, bias: torch.Tensor) -> nn.Module:
    """logits = W·flatten(x) + b."""
    lin = nn.Linear(weight.shape[1], weight.shape[0]).to(weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
        lin.bias.copy_(bias)
    return nn.Sequential(nn.Flatten(), lin)


def toy_data(n: int, seed: int = 0, dtype=torch.float64):
    """Separable toy images: class 0 has a bright left half, class 1 a bright right half, class 2 a bright top half.
    One pixel of every image sits exactly on 0 and one on 1, so the [0, 1] box is active."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % NUM_CLASSES
    x = 0.25 + 0.4 * torch.rand(n, 1, 8, 8, generator=g, dtype=torch.float64)
    x[y == 0, :, :, :4] += 0.3
    x[y == 1, :, :, 4:] += 0.3
    x[y == 2, :, :4, :] += 0.3
    x = x.clamp(0, 1)
    x[:, :, 0, 0] = 0.0
    x[:, :, 7, 7] = 1.0
    return x.to(dtype), y


@pytest.fixture(scope="module")
def trained():
    """A float64 TinyCNN trained to (near) 100 % on the toy problem, returned in eval mode, with data."""
    torch.manual_seed(0)
    model = TinyCNN().double()
    x, y = toy_data(96, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=0.03)
    model.train()
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    opt.zero_grad(set_to_none=True)
    xt, yt = toy_data(24, seed=2)
    with torch.no_grad():
        acc = (model(xt).argmax(1) == yt).double().mean().item()
    assert acc >= 0.95, f"premise: the toy model should be trained, test accuracy {acc}"
    return model, xt, yt


# ------------------------------------------------------------------------------------------------------ cases
@dataclass
class Case:
    id: str
    name: str  # registry name
    kwargs: dict = field(default_factory=dict)
    norm: str = "linf"

    def build(self, eps: float | None = None, **extra):
        eps = EPS[self.norm] if eps is None else eps
        return create_attack(self.name, eps=eps, **{**self.kwargs, **extra})


EPS = {"linf": 0.1, "l2": 0.5}
CASES = [
    Case("fgsm", "fgsm"),
    Case("rand_fgsm", "rand_fgsm"),
    Case("bim", "bim", {"steps": 5}),
    Case("mim", "mim", {"steps": 5}),
    Case("pgd_linf", "pgd", {"steps": 5}),
    Case("pgd_l2", "pgd_l2", {"steps": 5}, norm="l2"),
    Case("pgd_targeted", "pgd", {"steps": 5, "targeted": True}),
    Case("pgd_margin", "pgd_margin", {"steps": 5}),
    Case("pgd200", "pgd200", {"steps": 20}),  # steps of 0.01: 20 of them cross the 0.1-ball
    Case("pgd_madry", "pgd_madry", {"steps": 5}),
    Case("pgd_restarts", "pgd", {"steps": 5, "restarts": 3}),
    Case("trades_kl", "trades_kl", {"steps": 5}),
    Case("pgd_cosine", "pgd", {"steps": 5, "step_size": 0.1, "step_schedule": "cosine"}),
    Case("pgd_multitargeted", "pgd_targeted", {"steps": 5, "targets": 2}),
    Case("deepfool", "deepfool", norm="l2"),
    Case("deepfool_linf", "deepfool_linf"),  # its own tests (closed forms, torchattacks): tests/test_deepfool.py
    Case("fmn", "fmn", {"steps": 20}),  # its own tests (closed forms, DeepFool, adv-lib): tests/test_fmn.py
    Case("fmn_l2", "fmn_l2", {"steps": 20}, norm="l2"),
    Case("cw_l2", "cw_l2", {"steps": 50, "binary_search_steps": 3, "initial_const": 1.0}, norm="l2"),  # and its own
]
ITERATIVE = [c for c in CASES if "steps" in c.kwargs]
by_id = pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])


def target_for(y):
    return (y + 1) % NUM_CLASSES


def run(attack, model, x, y):
    return attack(model, x, y, target=target_for(y) if attack.targeted else None)


def objective(attack, model, x_eval, x_clean, y):
    """Per-example quantity the attack ascends, evaluated in eval mode."""
    with torch.no_grad():
        logits = model(x_eval)
        if attack.name == "trades_kl":
            p_clean = F.softmax(model(x_clean), dim=1)
            return F.kl_div(F.log_softmax(logits, dim=1), p_clean, reduction="none").sum(1)
        return attack_loss(logits, y, attack.loss, target_for(y) if attack.targeted else None)


def test_every_registered_attack_is_covered():
    # These lower an interpretation map's mass or raise a map discrepancy, not a classification loss, and need a
    # Classifier (features/head): they are covered by tests/test_aai.py and tests/test_discrepancy.py.
    # pgd_prototype needs a ProtoPNet: tests/test_pgd_prototype.py. AutoAttack runs its own package's code:
    # tests/test_evaluate.py checks it agrees with our suite, tests/test_autoattack.py its contract. pgd_ig_norm
    # (IG-Norm's inner maximisation): tests/test_ig_norm.py.
    covered_elsewhere = {"aai", "pgd_discrepancy", "pgd_ig_norm", "pgd_prototype", "autoattack", "autoattack_standard"}
    assert set(ATTACKS.names()) - covered_elsewhere <= {c.name for c in CASES}, \
        "add a Case for the new attack"


# ------------------------------------------------------------------------------------------- threat model
@by_id
def test_stays_in_eps_ball_and_box(case):
    torch.manual_seed(0)
    model = TinyCNN().eval()
    x, y = toy_data(16, dtype=torch.float32)
    x_before = x.clone()
    attack = case.build()
    eps = attack.eps
    x_adv = run(attack, model, x, y)

    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and not x_adv.requires_grad
    assert torch.equal(x, x_before), "the input must not be modified in place"
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(1) if case.norm == "linf" else delta.norm(dim=1)
    tol = 1e-6 if case.norm == "linf" else 1e-5
    assert (size <= eps + tol).all(), size.max().item()
    assert size.max() > 0.5 * eps, "the attack should actually move the input"


# -------------------------------------------------------------------------------------- model state restored
def _set_mode(model, start):
    if start == "train":
        model.train()
    elif start == "eval":
        model.eval()
    else:  # mixed: train mode with one submodule (the BatchNorm) in eval
        model.train()
        model.bn.eval()


@by_id
@pytest.mark.parametrize("bn_mode", ["eval", "train"])
@pytest.mark.parametrize("start", ["train", "eval", "mixed"])
def test_model_state_restored(case, bn_mode, start):
    torch.manual_seed(0)
    model = TinyCNN()
    x, y = toy_data(8, dtype=torch.float32)
    # Give the BN non-trivial running stats and most parameters a .grad; leave one .grad None, freeze one weight.
    model.train()
    model(x * 0.5).sum().backward()
    model.fc.bias.grad = None
    model.conv2.weight.requires_grad_(False)
    model.conv2.weight.grad = None
    _set_mode(model, start)

    modes = {n: m.training for n, m in model.named_modules()}
    grads = {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    assert {"bn.running_mean", "bn.running_var", "bn.num_batches_tracked"} <= set(buffers)

    # BN's mode and batch counter during the attack: proves bn_mode was applied and, for "train", that the attack
    # really moved the running statistics (so the restore below is what keeps them unchanged).
    seen, counts = [], []
    hooks = [model.bn.register_forward_pre_hook(lambda m, inp: seen.append(m.training)),
             model.bn.register_forward_hook(lambda m, inp, out: counts.append(m.num_batches_tracked.item()))]
    try:
        run(case.build(bn_mode=bn_mode), model, x, y)
    finally:
        for h in hooks:
            h.remove()

    assert seen and all(s == (bn_mode == "train") for s in seen)
    assert (max(counts) > buffers["bn.num_batches_tracked"].item()) == (bn_mode == "train")
    assert {n: m.training for n, m in model.named_modules()} == modes
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers[n]), f"buffer {n} changed"
    for n, p in model.named_parameters():
        assert p.requires_grad == flags[n], n
        assert torch.equal(p.detach(), params[n]), n
        if grads[n] is None:
            assert p.grad is None, f"{n}.grad was None and must stay None"
        else:
            assert p.grad is not None and torch.equal(p.grad, grads[n]), f"{n}.grad changed"


# ------------------------------------------------------------------------------------------------ efficacy
@by_id
def test_loss_increases_on_trained_model(case, trained):
    model, x, y = trained
    attack = case.build()
    torch.manual_seed(0)
    x_adv = run(attack, model, x, y)
    torch.manual_seed(1)
    if case.norm == "linf":
        x_rand = (x + attack.eps * torch.randn_like(x).sign()).clamp(0, 1)
    else:
        noise = torch.randn_like(x)
        x_rand = (x + attack.eps * noise / noise.flatten(1).norm(dim=1).view(-1, 1, 1, 1)).clamp(0, 1)

    clean, rand, adv = (objective(attack, model, xe, x, y) for xe in (x, x_rand, x_adv))
    # The attack beats the clean input and a random perturbation of the same size clearly on average (the weakest,
    # RAND-FGSM, gains ~0.38 here; random noise gains < 0.02), and per example for the vast majority.
    assert adv.mean() > clean.mean() + 0.25 and adv.mean() > rand.mean() + 0.25, (clean.mean(), rand.mean(), adv.mean())
    assert (adv > clean).double().mean() >= 0.9
    if attack.name != "trades_kl":
        with torch.no_grad():
            ce_clean = F.cross_entropy(model(x), y, reduction="none")
            ce_adv = F.cross_entropy(model(x_adv), y, reduction="none")
        if attack.targeted:  # targeted: the target class becomes likelier; the true class's CE rises too
            with torch.no_grad():
                t = target_for(y)
                assert (F.cross_entropy(model(x_adv), t, reduction="none")
                        < F.cross_entropy(model(x), t, reduction="none")).all()
        assert ce_adv.mean() > ce_clean.mean() + 0.25, (ce_clean.mean(), ce_adv.mean())


def test_targeted_pgd_lowers_target_ce(trained):
    model, x, y = trained
    t = target_for(y)
    torch.manual_seed(0)
    x_adv = PGD(0.15, steps=10, targeted=True)(model, x, y, target=t)
    with torch.no_grad():
        before = F.cross_entropy(model(x), t, reduction="none")
        after = F.cross_entropy(model(x_adv), t, reduction="none")
        hit = (model(x_adv).argmax(1) == t).double().mean()
    assert (after < before).all()
    assert after.mean() < before.mean() - 1.0
    assert hit > 0.3  # premise check: eps is large enough for the target to win often


@pytest.mark.parametrize("attack", [PGD(0.1, targeted=True), FGSM(0.1, targeted=True), MIM(0.1, targeted=True),
                                    BIM(0.1, targeted=True)], ids=["pgd", "fgsm", "mim", "bim"])
def test_targeted_without_target_raises(attack, trained):
    model, x, y = trained
    with pytest.raises(ValueError, match="target"):
        attack(model, x, y)


# ------------------------------------------------------------------------------- gradients at the [0,1] border
BORDER_ATTACKS = {
    "pgd_random_start": lambda eps: PGD(eps, steps=10, keep_best=False),
    # early_stop off: the test wants the iterate at the border, not the first misclassified one
    "pgd_restarts_best": lambda eps: PGD(eps, steps=10, restarts=2, early_stop=False),
    "bim": lambda eps: BIM(eps, steps=10),
    "mim": lambda eps: MIM(eps, steps=10),
    "fgsm_random_start": lambda eps: FGSM(eps, random_start=True),
}


@pytest.mark.parametrize("side", ["zeros", "ones"])
@pytest.mark.parametrize("make", list(BORDER_ATTACKS.values()), ids=list(BORDER_ATTACKS))
def test_gradient_alive_at_box_border(make, side):
    """Loss grows with every pixel (zeros) or falls with every pixel (ones): every pixel must end ε inside.
    An implementation that clamps inside the graph (x_adv = clamp(x + δ), gradient w.r.t. δ) leaves pixels whose
    random start fell outside the box with zero gradient, stuck on the border."""
    eps, d = 0.1, 16
    sign = 1.0 if side == "zeros" else -1.0
    w = torch.stack([-sign * torch.ones(d), sign * torch.ones(d)]).double()
    model = linear_model(w, torch.zeros(2, dtype=torch.float64))
    x = torch.full((4, 1, 4, 4), 0.0 if side == "zeros" else 1.0, dtype=torch.float64)
    y = torch.zeros(4, dtype=torch.long)
    torch.manual_seed(0)
    x_adv = make(eps)(model, x, y)
    expected = torch.full_like(x, eps if side == "zeros" else 1 - eps)
    torch.testing.assert_close(x_adv, expected, atol=1e-9, rtol=0)


# ----------------------------------------------------------------------------------------------- closed forms
@pytest.fixture
def linear_problem():
    g = torch.Generator().manual_seed(3)
    d, n = 16, 8
    w = torch.randn(NUM_CLASSES, d, generator=g, dtype=torch.float64)
    b = torch.randn(NUM_CLASSES, generator=g, dtype=torch.float64)
    x = torch.rand(n, 1, 4, 4, generator=g, dtype=torch.float64)
    x[:, :, 0, :2] = torch.tensor([0.0, 1.0], dtype=torch.float64)  # on the box border
    y = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    return linear_model(w, b), w, b, x, y


def _ce_grad(w, b, x, cls):
    """∇_x CE(Wx + b, cls) = Wᵀ(softmax(Wx + b) − onehot(cls)), by hand."""
    flat = x.flatten(1)
    p = torch.softmax(flat @ w.T + b, dim=1)
    return ((p - F.one_hot(cls, NUM_CLASSES).double()) @ w).view_as(x)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_projection_keeps_points_inside_the_ball_bit_for_bit(norm):
    """A minimal-perturbation attack hands back its point as is when it fits in ε; in float32 x + (x' − x) is not
    always x' (0.49625659 + (0.00075720868 − 0.49625659) = 0.00075721741)."""
    from robust_train.attacks.base import project
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 1, 8, 8, generator=g)
    x_adv = x.clone()
    x_adv[:, 0, :2, :2] = 1e-3 * torch.rand(64, 2, 2, generator=g)  # a few pixels moved far, towards 0
    delta = (x_adv - x).flatten(1)
    eps = (delta.norm(dim=1) if norm == "l2" else delta.abs().amax(1)).max().item() * 1.01
    assert not torch.equal(x + (x_adv - x), x_adv)  # the rounding this guards against happens here
    assert torch.equal(project(x_adv, x, eps, norm), x_adv)
    # Outside the ball: onto its surface (L2) or its box (L∞), and into [0, 1].
    far = project(x + 10 * (x_adv - x), x, eps, norm)
    sizes = (far - x).flatten(1).norm(dim=1) if norm == "l2" else (far - x).flatten(1).abs().amax(1)
    assert (sizes <= eps * (1 + 1e-6)).all() and far.min() >= 0 and far.max() <= 1


def test_fgsm_closed_form_linear(linear_problem):
    model, w, b, x, y = linear_problem
    eps = 0.07
    expected = (x + eps * _ce_grad(w, b, x, y).sign()).clamp(0, 1)
    torch.testing.assert_close(FGSM(eps)(model, x, y), expected, atol=1e-12, rtol=0)
    # targeted: descend the target's CE
    t = target_for(y)
    expected_t = (x - eps * _ce_grad(w, b, x, t).sign()).clamp(0, 1)
    torch.testing.assert_close(FGSM(eps, targeted=True)(model, x, y, target=t), expected_t, atol=1e-12, rtol=0)


def test_margin_loss_step_closed_form_linear(linear_problem):
    """One PGD step on the margin max_{j≠y} z_j − z_y moves along sign(W_{j*} − W_y)."""
    model, w, b, x, y = linear_problem
    eps = 0.05
    z = x.flatten(1) @ w.T + b
    j_star = z.scatter(1, y[:, None], float("-inf")).argmax(1)
    expected = (x + eps * (w[j_star] - w[y]).sign().view_as(x)).clamp(0, 1)
    attack = PGD(eps, steps=1, step_size=eps, random_start=False, keep_best=False, loss="margin")
    torch.testing.assert_close(attack(model, x, y), expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("step_size", [0.2, 2.0], ids=["inside", "projected"])
def test_l2_step_closed_form_linear(linear_problem, step_size):
    """One L2 step: x + α g/‖g‖, radially projected onto the ε-sphere when α > ε, then clipped to [0, 1]."""
    model, w, b, x, y = linear_problem
    eps = 0.5
    g = _ce_grad(w, b, x, y)
    unit = g / g.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    expected = (x + min(step_size, eps) * unit).clamp(0, 1)
    attack = PGD(eps, norm="l2", steps=1, step_size=step_size, random_start=False, keep_best=False)
    torch.testing.assert_close(attack(model, x, y), expected, atol=1e-12, rtol=0)


# ----------------------------------------------------------------------------------------------- equivalences
def test_mim_without_momentum_is_bim(trained):
    model, x, y = trained
    mim = MIM(0.1, steps=7, step_size=0.02, decay=0.0)(model, x, y)
    bim = BIM(0.1, steps=7, step_size=0.02)(model, x, y)
    assert torch.equal(mim, bim)
    # ... and momentum does change the result (otherwise the comparison above proves nothing about decay)
    assert not torch.equal(MIM(0.1, steps=7, step_size=0.02, decay=1.0)(model, x, y), bim)


def test_pgd_without_random_start_is_bim(trained):
    model, x, y = trained
    pgd = PGD(0.1, steps=7, step_size=0.03, random_start=False, keep_best=False)(model, x, y)
    bim = BIM(0.1, steps=7, step_size=0.03)(model, x, y)
    assert torch.equal(pgd, bim)
    assert BIM(0.1, steps=7).step_size == pytest.approx(0.1 / 7)


def test_rand_fgsm_with_zero_alpha_is_fgsm(trained):
    model, x, y = trained
    torch.manual_seed(0)
    r = RandFGSM(0.1, alpha=0.0)(model, x, y)
    assert torch.equal(r, FGSM(0.1)(model, x, y))
    torch.manual_seed(0)
    assert not torch.equal(RandFGSM(0.1, alpha=0.05)(model, x, y), r)


# ----------------------------------------------------------------------------------------- keep_best, restarts
def _success_and_loss(model, x_adv, y):
    with torch.no_grad():
        logits = model(x_adv)
    return logits.argmax(1) != y, F.cross_entropy(logits, y, reduction="none")


def test_keep_best_and_restarts_never_worse(trained):
    model, x, y = trained
    eps, kw = 0.08, dict(steps=5, step_size=0.04)  # ~1/3 broken by one run: room for keep_best and restarts

    def attack_with_seed(**extra):
        torch.manual_seed(7)
        return PGD(eps, **kw, **extra)(model, x, y)

    s_last, l_last = _success_and_loss(model, attack_with_seed(keep_best=False), y)
    s_best, l_best = _success_and_loss(model, attack_with_seed(keep_best=True), y)
    s_multi, l_multi = _success_and_loss(model, attack_with_seed(keep_best=True, restarts=4), y)
    assert 0.1 <= s_last.double().mean() <= 0.9, "premise: the setup must leave room to improve"

    # Per example: a success is never lost; without success, the loss is never lower.
    assert (s_best >= s_last).all() and (s_multi >= s_best).all()
    assert (l_best[~s_best & ~s_last] >= l_last[~s_best & ~s_last] - 1e-12).all()
    assert (l_multi[~s_multi & ~s_best] >= l_best[~s_multi & ~s_best] - 1e-12).all()
    # On this fixed setup restarts do find more (so the comparisons above are not vacuous).
    assert s_multi.sum() > s_last.sum()


def test_keep_best_returns_strongest_iterate(trained):
    """Without random start the iterates are BIM's; keep_best must return, per example, the highest-loss successful
    iterate if any, else the highest-loss one (first one on ties) among x_0 = x, x_1, ..., x_k."""
    model, x, y = trained
    eps, alpha, k = 0.12, 0.07, 5
    iterates = [x] + [BIM(eps, steps=t, step_size=alpha)(model, x, y) for t in range(1, k + 1)]
    stats = [_success_and_loss(model, it, y) for it in iterates]
    success = torch.stack([s for s, _ in stats])  # (k+1, N)
    loss = torch.stack([l for _, l in stats])
    key = torch.where(success.any(0, keepdim=True), loss.masked_fill(~success, -math.inf), loss)
    pick = key.argmax(0)
    expected = torch.stack(iterates)[pick, torch.arange(len(y))]
    assert len(set(pick.tolist())) > 1, "premise: different examples peak at different iterates"
    got = PGD(eps, steps=k, step_size=alpha, random_start=False, keep_best=True, early_stop=False)(model, x, y)
    assert torch.equal(got, expected)

    # With early stopping (the default) a broken example comes back at its first successful iterate instead;
    # the others still at their highest-loss one.
    first = torch.where(success.any(0), success.float().argmax(0), pick)
    assert (first != pick).any(), "premise: some example succeeds again later with a higher loss"
    got = PGD(eps, steps=k, step_size=alpha, random_start=False, keep_best=True)(model, x, y)
    assert torch.equal(got, torch.stack(iterates)[first, torch.arange(len(y))])


class _RowCounter:
    """Counts the examples the model is run on (a forward pre-hook), to see early stopping save work."""

    def __init__(self, model):
        self.rows = 0
        self.handle = model.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.rows += args[0].shape[0]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.mark.parametrize("targeted", [False, True])
def test_early_stop_same_successes_less_work(trained, targeted):
    """Dropping examples once they are broken changes no example's success (each example's forward in eval mode
    does not depend on the rest of the batch, and the random starts are drawn for the whole batch), and runs the
    model on fewer examples. Targeted: success means reaching the target."""
    model, x, y = trained
    target = (y + 1) % 3 if targeted else None
    eps, kw = 0.1, dict(steps=8, step_size=0.04, restarts=3, targeted=targeted)

    def run_counted(**extra):
        torch.manual_seed(3)
        with _RowCounter(model) as counter:
            x_adv = PGD(eps, **kw, **extra)(model, x, y, target)
        with torch.no_grad():
            pred = model(x_adv).argmax(1)
        return (pred == target if targeted else pred != y), x_adv, counter.rows

    s_all, x_all, rows_all = run_counted(early_stop=False)
    s_early, x_early, rows_early = run_counted()
    assert 0.2 <= s_all.double().mean() <= 0.9, "premise: some examples fall, some hold"
    assert torch.equal(s_early, s_all)
    assert rows_all == 3 * (8 + 1) * len(x)
    assert rows_early < 0.8 * rows_all
    # Examples that hold are attacked identically: same iterate returned.
    assert torch.equal(x_early[~s_all], x_all[~s_all])
    for x_adv in (x_all, x_early):
        assert (x_adv - x).abs().max() <= eps + 1e-12 and x_adv.min() >= 0 and x_adv.max() <= 1


def test_early_stop_every_few_steps_as_on_a_gpu(trained, monkeypatch):
    """On CUDA the broken examples are dropped every 8 steps, not every step; the same code path here on the CPU
    (interval 3, so drops fall mid-restart) gives the same outcomes as no early stopping."""
    import robust_train.attacks.pgd as pgd_module

    model, x, y = trained
    outcomes = {}
    for interval in (None, 3):
        if interval:
            monkeypatch.setattr(pgd_module, "compaction_interval", lambda x: interval)
        torch.manual_seed(5)
        x_adv = PGD(0.1, steps=8, step_size=0.04, restarts=2, early_stop=interval is not None)(model, x, y)
        with torch.no_grad():
            outcomes[interval] = model(x_adv).argmax(1) != y
        assert (x_adv - x).abs().max() <= 0.1 + 1e-12
    assert 0.2 <= outcomes[None].double().mean() <= 0.9
    assert torch.equal(outcomes[3], outcomes[None])


def test_early_stop_off_in_train_bn_mode(trained):
    """With batch statistics (bn_mode="train") an example's forward depends on the batch: nobody is dropped."""
    model, x, y = trained
    with _RowCounter(model) as counter:
        PGD(0.1, steps=4, step_size=0.05, bn_mode="train")(model, x, y)
    assert counter.rows == (4 + 1) * len(x)
    assert not model.training


def test_best_iterate_rule_prefers_success_over_loss():
    """The selection rule itself (private helper, so the rule is pinned even where CE makes it rarely matter): a
    misclassified iterate beats a correctly classified one with a higher loss; otherwise the higher loss wins."""
    from robust_train.attacks.pgd import _Best

    y, rows = torch.tensor([0, 0]), torch.arange(2)
    x0, x1, x2 = (torch.full((2, 1), v) for v in (0.0, 1.0, 2.0))
    wrong = torch.log(torch.tensor([[0.45, 0.50, 0.05], [0.90, 0.05, 0.05]]))  # ex 0: misclassified, CE 0.80
    right = torch.log(torch.tensor([[0.40, 0.30, 0.30], [0.60, 0.20, 0.20]]))  # ex 0: correct, CE 0.92 (higher)
    best = _Best(x0)
    best.update(rows, x1, wrong, attack_loss(wrong, y), y, None)
    best.update(rows, x2, right, attack_loss(right, y), y, None)
    assert best.x[:, 0].tolist() == [1.0, 2.0]  # ex 0 keeps the success; ex 1 (never fooled) the higher loss
    assert best.success.tolist() == [True, False]
    # targeted: success means predicting the target
    t = torch.tensor([1, 2])
    best = _Best(x0)
    best.update(rows, x1, wrong, attack_loss(wrong, y, target=t), y, t)
    best.update(rows, x2, right, attack_loss(right, y, target=t), y, t)
    assert best.x[:, 0].tolist() == [1.0, 2.0] and best.success.tolist() == [True, False]


# --------------------------------------------------------------------------------------------- argument checks
@by_id
def test_zero_eps_returns_input(case, trained):
    model, x, y = trained
    x_adv = run(case.build(eps=0.0), model, x, y)
    assert torch.equal(x_adv, x) and x_adv.data_ptr() != x.data_ptr()


@by_id
def test_invalid_eps_raises(case):
    bad = [-0.1, math.nan, math.inf] + ([1.5] if case.norm == "linf" else [])
    for eps in bad:
        with pytest.raises(ConfigError, match="eps"):
            case.build(eps=eps)
    if case.norm == "l2":
        assert case.build(eps=1.5).eps == 1.5  # an L2 radius above 1 is legitimate


@pytest.mark.parametrize("case", ITERATIVE, ids=[c.id for c in ITERATIVE])
def test_invalid_steps_and_step_size_raise(case):
    for bad in ({"steps": 0}, {"steps": -3}, {"step_size": 0.0}, {"step_size": -0.1}, {"step_size": math.nan}):
        with pytest.raises(ConfigError):
            case.build(**bad)


def test_other_invalid_arguments_raise(trained):
    model, x, y = trained
    with pytest.raises(ConfigError):
        PGD(0.1, restarts=0)
    with pytest.raises(ConfigError, match="norm"):
        PGD(0.1, norm="l1")
    with pytest.raises(ConfigError, match="loss"):
        PGD(0.1, loss="hinge")
    with pytest.raises(ConfigError, match="alpha"):
        RandFGSM(0.1, alpha=0.2)
    with pytest.raises(ConfigError, match="bn_mode"):
        PGD(0.1, bn_mode="frozen")(model, x, y)
    assert not model.training


def test_create_attack_unknown_name():
    with pytest.raises(ConfigError) as info:
        create_attack("nope", eps=0.1)
    for name in ATTACKS.names():
        assert name in str(info.value)
    assert isinstance(create_attack("pgd", eps=0.1, steps=3), PGD)


# ----------------------------------------------------------------------------------------- grad-mode contexts
def test_inference_mode_raises_clear_error(trained):
    model, x, y = trained
    with torch.inference_mode():
        with pytest.raises(RuntimeError, match="inference"):
            PGD(0.1, steps=2)(model, x, y)


@pytest.mark.parametrize("make", [lambda: PGD(0.1, steps=3), lambda: FGSM(0.1), lambda: MIM(0.1, steps=3)],
                         ids=["pgd", "fgsm", "mim"])
def test_no_grad_still_works(make, trained):
    model, x, y = trained
    torch.manual_seed(0)
    expected = make()(model, x, y)
    torch.manual_seed(0)
    with torch.no_grad():
        got = make()(model, x, y)
        assert not torch.is_grad_enabled()  # the caller's grad mode is restored
    assert torch.equal(got, expected) and not torch.equal(got, x)


# ------------------------------------------------------------------------------------------ torchattacks parity
torchattacks = pytest.importorskip("torchattacks")


@pytest.fixture
def parity(trained):
    """The trained float64 CNN and a batch of 8 (a power of two: torchattacks averages the loss, we sum it, and
    the factor 1/8 is exact in floating point, so even MI-FGSM's gradient normalisation matches bit for bit)."""
    model, x, y = trained
    return model, x[:8], y[:8]


@pytest.mark.parametrize("start", ["eval", "train"])
def test_matches_torchattacks(parity, start):
    model, x, y = parity
    model.train(start == "train")  # torchattacks switches to eval for the attack; ours does too (bn_mode="eval")
    try:
        pairs = {
            "fgsm": (FGSM(0.1), torchattacks.FGSM(model, eps=0.1)),
            "bim": (BIM(0.1, steps=7, step_size=0.02), torchattacks.BIM(model, eps=0.1, alpha=0.02, steps=7)),
            "pgd": (PGD(0.1, steps=7, step_size=0.03, random_start=False, keep_best=False),
                    torchattacks.PGD(model, eps=0.1, alpha=0.03, steps=7, random_start=False)),
            "mim": (MIM(0.1, steps=7, step_size=0.02, decay=1.0),
                    torchattacks.MIFGSM(model, eps=0.1, alpha=0.02, steps=7, decay=1.0)),
            "mim_half": (MIM(0.1, steps=7, step_size=0.02, decay=0.5),
                         torchattacks.MIFGSM(model, eps=0.1, alpha=0.02, steps=7, decay=0.5)),
        }
        for name, (ours, theirs) in pairs.items():
            a, b = ours(model, x, y), theirs(x, y)
            assert model.training == (start == "train")
            assert not torch.equal(a, x), name
            torch.testing.assert_close(a, b, atol=1e-10, rtol=0, msg=name)
    finally:
        model.eval()


def test_targeted_pgd_matches_torchattacks(parity):
    model, x, y = parity
    t = target_for(y)
    theirs = torchattacks.PGD(model, eps=0.1, alpha=0.03, steps=7, random_start=False)
    theirs.set_mode_targeted_by_function(lambda images, labels: (labels + 1) % NUM_CLASSES, quiet=True)
    ours = PGD(0.1, steps=7, step_size=0.03, random_start=False, keep_best=False, targeted=True)
    torch.testing.assert_close(ours(model, x, y, target=t), theirs(x, y), atol=1e-10, rtol=0)


def test_cosine_schedule_starts_at_step_size_and_decays_to_zero():
    attack = create_attack("pgd", eps=0.3, steps=10, step_size=0.3, step_schedule="cosine")
    steps = [attack.step_at(t) for t in range(10)]
    assert steps[0] == pytest.approx(0.3) and steps[5] == pytest.approx(0.15)
    assert all(a > b for a, b in zip(steps, steps[1:])) and steps[-1] > 0
    with pytest.raises(ConfigError):
        create_attack("pgd", eps=0.3, step_schedule="linear")


def test_multitargeted_pgd_with_more_targets_breaks_a_superset():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, NUM_CLASSES)).double()
    x = torch.rand(64, 3, 8, 8, dtype=torch.float64)
    y = model(x).argmax(1)  # all correct at the start
    broken = {}
    for k in (1, NUM_CLASSES - 1):
        torch.manual_seed(1)
        x_adv = create_attack("pgd_targeted", eps=0.02, steps=10, targets=k)(model, x, y)
        assert (x_adv - x).abs().max() <= 0.02 + 1e-9
        broken[k] = model(x_adv).argmax(1) != y
    assert 0 < broken[1].sum() <= broken[NUM_CLASSES - 1].sum() < 64
    assert (broken[NUM_CLASSES - 1] | ~broken[1]).all(), "every example broken with 1 target stays broken with more"
