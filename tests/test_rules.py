"""Each rule of docs/method.md §2 on hand-computed tiny cases, and the fast forms against the reference forms."""

import pytest
import torch

from transformer_lrp.ops import (
    attention_av_relevance,
    attention_qk_relevance,
    clone_relevance,
    linear_alpha1beta0,
    linear_alpha1beta0_ref,
    linear_alpha1beta0_separate,
    normalized_add,
    patch_embed_zb_relevance,
    safe_divide,
    select_relevance,
    z_add,
)

D = torch.float64


def t(*rows):
    return torch.tensor(rows, dtype=D)


def close(a, b, tol=1e-8):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_safe_divide_matches_spec_values():
    # docs/method.md §2.2: safe_divide(1, [0, 1e-12, -1e-12, -1e-9, 0.5, -0.5]) = [0, 9.99e8, +1.001e9, 1e9, 2, -2]
    b = t(0.0, 1e-12, -1e-12, -1e-9, 0.5, -0.5)
    out = safe_divide(torch.ones_like(b), b)
    expected = t(0.0, 1 / (1e-12 + 1e-9), 1 / (-1e-12 + 1e-9), 1 / 1e-9, 1 / (0.5 + 1e-9), 1 / (-0.5 + 1e-9))
    close(out, expected, 1e-12)
    assert out[0] == 0 and out[2] > 0 and out[3] > 0  # dropped at 0; sign flip just below 0


# x = [1, -2]; W = [[1, 1], [2, -1]]; R = [0.6, 0.4]
# unit 0: contributions [1, -2] -> positive mass 1, all of R_0 to x_0
# unit 1: contributions [2, 2]  -> mass 4, half of R_1 to each input
X, W, R = t(1.0, -2.0), t([1.0, 1.0], [2.0, -1.0]), t(0.6, 0.4)


@pytest.mark.parametrize("rule", [linear_alpha1beta0_ref, linear_alpha1beta0], ids=["reference", "sign_split"])
def test_linear_alpha1beta0_hand_case(rule):
    close(rule(X, W, R), t(0.6 + 0.2, 0.2))


@pytest.mark.parametrize("rule", [linear_alpha1beta0_ref, linear_alpha1beta0], ids=["reference", "sign_split"])
def test_linear_alpha1beta0_drops_units_without_positive_contribution(rule):
    # docs/method.md §2.4 / issue #59: unit 1 has contributions [-1, -2] only -> its relevance is lost, not divided.
    x, w, r = t(1.0, 1.0), t([1.0, 0.5], [-1.0, -2.0]), t(0.0, 5.0)
    assert torch.equal(rule(x, w, r), t(0.0, 0.0))
    # and an all-zero input carries nothing
    assert torch.equal(rule(t(0.0, 0.0), w, r), t(0.0, 0.0))


def test_sign_split_equals_reference_on_random_layers():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 7, 37, generator=g, dtype=D)
    w = torch.randn(23, 37, generator=g, dtype=D)
    r = torch.randn(5, 7, 23, generator=g, dtype=D)
    ref = linear_alpha1beta0_ref(x, w, r)
    close(linear_alpha1beta0(x, w, r), ref, 1e-10)
    # given the forward's own output x Wᵀ + b and its bias (what the engine passes), the same
    b = torch.randn(23, generator=g, dtype=D)
    close(linear_alpha1beta0(x, w, r, output=x @ w.T + b, bias=b), ref, 1e-10)
    close(linear_alpha1beta0(x, w, r, abs_weight=w.abs()), ref, 1e-10)
    # conservation per output unit: every unit here has positive mass
    close(ref.sum(-1), r.sum(-1), 1e-6)


def test_abs_weight_cache_follows_weight_changes():
    from transformer_lrp.adapters.spec import LinearSpec

    lin = torch.nn.Linear(4, 3).double()
    spec = LinearSpec.of(lin)
    first = spec.abs_weight
    assert torch.equal(first, lin.weight.abs()) and spec.abs_weight is first  # cached
    with torch.no_grad():
        lin.weight.mul_(-2)  # an in-place update (as an optimizer step) invalidates it
    assert torch.equal(LinearSpec.of(lin).abs_weight, lin.weight.abs())
    lin.weight = torch.nn.Parameter(torch.ones(3, 4, dtype=D))  # so does a new parameter
    assert torch.equal(LinearSpec.of(lin).abs_weight, torch.ones(3, 4, dtype=D))


def test_sign_split_treats_cancellation_noise_as_zero():
    # Unit 0's positive mass (1e-20) is far below the rounding noise of x Wᵀ + |x||W|ᵀ (~1e-16): the fast form
    # must not divide by that noise. The reference keeps it but, with its +1e-9, returns ~1e-11·R: both ≈ 0.
    x, w, r = t(1.0, 1.0), t([1e-20, -1.0]), t(1.0)
    fast = linear_alpha1beta0(x, w, r)
    assert torch.isfinite(fast).all() and fast.abs().max() < 1e-9
    close(fast, linear_alpha1beta0_ref(x, w, r), 1e-9)


def test_sign_split_float32_agrees_with_float64_reference():
    g = torch.Generator().manual_seed(2)
    x, w, r = (torch.randn(*s, generator=g, dtype=D) for s in ((64, 48), (40, 48), (64, 40)))
    ref = linear_alpha1beta0_ref(x, w, r)
    fast32 = linear_alpha1beta0(x.float(), w.float(), r.float()).double()
    assert (fast32 - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_linear_separate_normalizers_hand_case():
    # docs/method.md §2.4 (baseline file): unit 1 has one positive group from x⁺W⁺ (2) and one from x⁻W⁻ (2): each
    # gets the full 0.4, so the total is 1.4, not 1.
    out = linear_alpha1beta0_separate(X, W, R)
    close(out, t(0.6 + 0.4, 0.4))


def test_normalized_add_positive_branches_is_plain_z_rule():
    u, v, r = t([3.0, 1.0]), t([1.0, 2.0]), t([2.0, 1.0])
    ru, rv = normalized_add(r, u, v)
    zu, zv = z_add(r, u, v)
    close(ru, zu)
    close(rv, zv)
    close(ru, t([3.0 / 4 * 2, 1.0 / 3]))


def test_normalized_add_sign_flip_hand_case():
    # u=[3,1], v=[-1,1], R=[2,1]: raw R̃_u=[3, .5] (sum 3.5), R̃_v=[-1, .5] (sum -.5), ΣR = 3.
    # Targets f_u = 3.5/4·3 = 2.625, f_v = 0.5/4·3 = 0.375 -> R_u = .75·R̃_u, R_v = -.75·R̃_v (sign flipped).
    u, v, r = t([3.0, 1.0]), t([-1.0, 1.0]), t([2.0, 1.0])
    ru, rv = normalized_add(r, u, v)
    close(ru, t([2.25, 0.375]))
    close(rv, t([0.75, -0.375]))
    close(ru.sum() + rv.sum(), r.sum())


def test_normalized_add_zero_cases():
    u, v = t([1.0, 3.0]), t([1.0, -1.0])
    # a branch whose raw total is exactly 0 gets nothing; the other gets all of ΣR
    ru, rv = normalized_add(t([1.0, 1.0]), u, v)
    close(ru, t([0.5, 1.5]))
    assert torch.equal(rv, t([0.0, 0.0]))
    # no incoming relevance -> none out; Z == 0 at an entry -> that entry dropped
    ru, rv = normalized_add(t([0.0, 0.0]), u, v)
    assert torch.equal(ru, t([0.0, 0.0])) and torch.equal(rv, t([0.0, 0.0]))
    ru, rv = z_add(t([1.0, 1.0]), t([1.0, 2.0]), t([-1.0, 1.0]))
    assert ru[0, 0] == 0 and rv[0, 0] == 0


def test_normalized_add_sums_per_sample():
    # sample 0 as in the sign-flip case; sample 1 all positive. Each keeps its own total (the original's whole-
    # batch sums would mix them).
    u = torch.stack([t([3.0, 1.0]), t([1.0, 1.0])])
    v = torch.stack([t([-1.0, 1.0]), t([1.0, 3.0])])
    r = torch.stack([t([2.0, 1.0]), t([1.0, 1.0])])
    ru, rv = normalized_add(r, u, v)
    close(ru.sum((1, 2)) + rv.sum((1, 2)), r.sum((1, 2)))
    close(ru[0], normalized_add(r[:1], u[:1], v[:1])[0][0])
    close(ru[1], z_add(r[1:], u[1:], v[1:])[0][0])  # sample 1 alone is all positive: plain z-rule


def test_clone_sums_branches_and_drops_zero_inputs():
    x = t(0.0, 2.0, -1.0)
    out = clone_relevance(x, t(1.0, 1.0, 1.0), t(1.0, 2.0, 0.5))
    close(out, t(0.0, 3.0 * 2 / (2 + 1e-9), 1.5 * -1 / (-1 + 1e-9)), 1e-14)


def test_select_scatters_to_the_pooled_token_only():
    tokens = t([1.0, 0.0], [5.0, 6.0], [7.0, 8.0])[None]  # [1, 3, 2]
    out = select_relevance(tokens, 0, t([0.3, 0.7]))
    assert torch.equal(out[0, 1:], torch.zeros(2, 2, dtype=D))
    close(out[0, 0], t(0.3 * 1 / (1 + 1e-9), 0.0))  # the zero feature drops its relevance


def test_attention_av_hand_case_and_halving():
    attn, v = t([[[[1.0]]]]), t([[[[2.0]]]])
    ra, rv = attention_av_relevance(attn, v, attn @ v, t([[[[1.0]]]]))
    close(ra, t([[[[0.5]]]]))
    close(rv, t([[[[0.5]]]]))


def test_attention_rules_conserve_half_each():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 3, 5, 4, generator=g, dtype=D) for _ in range(3))
    dots = q @ k.transpose(-1, -2)
    attn = (dots * 0.5).softmax(-1)
    out = attn @ v
    r_out = torch.randn(2, 3, 5, 4, generator=g, dtype=D)
    ra, rv = attention_av_relevance(attn, v, out, r_out)
    close(ra.sum((1, 2, 3)), 0.5 * r_out.sum((1, 2, 3)), 1e-6)
    close(rv.sum((1, 2, 3)), 0.5 * r_out.sum((1, 2, 3)), 1e-6)
    rq, rk = attention_qk_relevance(q, k, dots, ra)
    close(rq.sum((1, 2, 3)), rk.sum((1, 2, 3)), 1e-6)
    close(rq.sum((1, 2, 3)) * 2, ra.sum((1, 2, 3)), 1e-6)


def test_patch_embed_zb_against_per_patch_formula():
    g = torch.Generator().manual_seed(4)
    img = torch.randn(2, 3, 8, 12, generator=g, dtype=D)
    w = torch.randn(5, 3, 4, 4, generator=g, dtype=D)
    rel = torch.randn(2, 5, 2, 3, generator=g, dtype=D)
    out = patch_embed_zb_relevance(img, w, (4, 4), (0, 0), rel)
    # independent oracle: each output unit redistributes over its own 3x4x4 patch
    expected = torch.zeros_like(img)
    for b in range(2):
        lo, hi = img[b].min(), img[b].max()
        for i in range(2):
            for j in range(3):
                patch = img[b, :, 4 * i : 4 * i + 4, 4 * j : 4 * j + 4]
                for d in range(5):
                    c = patch * w[d] - lo * w[d].clamp(min=0) - hi * w[d].clamp(max=0)
                    expected[b, :, 4 * i : 4 * i + 4, 4 * j : 4 * j + 4] += c / (c.sum() + 1e-9) * rel[b, d, i, j]
    close(out, expected, 1e-9)
    close(out.sum((1, 2, 3)), rel.sum((1, 2, 3)), 1e-6)  # z^B conserves
