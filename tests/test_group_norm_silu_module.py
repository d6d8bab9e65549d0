"""GroupNormSiLU, the module (a drop-in for nn.GroupNorm followed by nn.SiLU,
parametrized weights, torch.export and torch.compile through it), and
fuse_group_norm_silu, the helper that swaps such pairs in a model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import requires_extension
from ddpm_fast.nn import GroupNormSiLU, fuse_group_norm_silu


@requires_extension
def test_torch_export_over_a_module_with_a_dynamic_batch():
    """What the README says of torch.export: the C++ op's fake implementation
    lets it export, and the exported program runs the op."""
    module = GroupNormSiLU(2, 4, backend="cpu")
    exported = torch.export.export(module, (torch.randn(3, 4, 5, 5),), dynamic_shapes=({0: torch.export.Dim("n")},))
    assert "ddpm_fast.group_norm_silu" in str(exported.graph)
    x = torch.randn(5, 4, 5, 5)
    assert torch.equal(exported.module()(x), module(x))


@requires_extension
def test_torch_compile_fullgraph_over_a_module():
    block = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), GroupNormSiLU(4, 8, backend="cpu"), nn.Conv2d(8, 4, 1))
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    torch.testing.assert_close(out, block(x))
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_module_is_a_drop_in_for_group_norm():
    fused, plain = GroupNormSiLU(4, 12), nn.GroupNorm(4, 12)
    assert fused.state_dict().keys() == plain.state_dict().keys()
    nn.init.normal_(plain.weight)
    nn.init.normal_(plain.bias)
    fused.load_state_dict(plain.state_dict())
    x = torch.randn(3, 12, 5, 5)
    torch.testing.assert_close(fused(x), F.silu(plain(x)))
    assert torch.equal(GroupNormSiLU(4, 12, act=False, backend="reference")(x), nn.GroupNorm(4, 12)(x))
    add = torch.randn(3, 12)
    torch.testing.assert_close(fused(x, add), F.silu(plain(x + add[:, :, None, None])))


def test_module_uses_a_parametrized_weight():
    """forward reads the parameters from the module's dict, for speed; a
    weight under torch.nn.utils.parametrize is not there, and must still be
    used (computed by its parametrization), gradients included."""
    from torch.nn.utils import parametrize

    class Doubled(nn.Module):
        def forward(self, w):
            return 2 * w

    fused = GroupNormSiLU(2, 6)
    nn.init.normal_(fused.bias)
    parametrize.register_parametrization(fused, "weight", Doubled())
    with torch.no_grad():
        fused.parametrizations.weight.original.copy_(torch.randn(6))
    assert "weight" not in fused._parameters
    x = torch.randn(2, 6, 4, 4)
    y = fused(x)
    torch.testing.assert_close(y, F.silu(F.group_norm(x, 2, fused.weight, fused.bias)))
    y.sum().backward()
    assert fused.parametrizations.weight.original.grad is not None


def test_fuse_helper_replaces_pairs_and_keeps_outputs():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.GroupNorm(4, 8), nn.SiLU(),
        nn.Sequential(nn.GroupNorm(2, 8), nn.SiLU(), nn.Conv2d(8, 8, 1)),
        nn.GroupNorm(2, 8),  # no SiLU after it: left alone
    )
    x = torch.randn(2, 3, 9, 9)
    before = model(x)
    keys = set(model.state_dict())
    assert fuse_group_norm_silu(model) == 2
    assert isinstance(model[1], GroupNormSiLU) and isinstance(model[2], nn.Identity)
    assert type(model[4]) is nn.GroupNorm
    assert set(model.state_dict()) == keys
    torch.testing.assert_close(model(x), before)


def test_fuse_helper_leaves_subclasses_and_hooked_modules_alone():
    """A Sequential subclass may not run its children in order, a SiLU subclass
    may compute another function (both were fused, with wrong outputs), and a
    hook on a norm or SiLU would stop running."""

    class Parallel(nn.Sequential):
        def forward(self, x):
            return sum(m(x) for m in self)

    class ScaledSiLU(nn.SiLU):
        def forward(self, x):
            return 2 * super().forward(x)

    hooked_norm, hooked_act, backward_hooked = nn.GroupNorm(2, 4), nn.SiLU(), nn.GroupNorm(2, 4)
    calls = []
    hooked_norm.register_forward_hook(lambda *args: calls.append("norm"))
    hooked_act.register_forward_pre_hook(lambda *args: calls.append("act"))
    backward_hooked.register_full_backward_hook(lambda *args: None)
    model = nn.Sequential(
        Parallel(nn.GroupNorm(2, 4), nn.SiLU()),
        nn.Sequential(nn.GroupNorm(2, 4), ScaledSiLU()),
        nn.Sequential(hooked_norm, nn.SiLU()),
        nn.Sequential(nn.GroupNorm(2, 4), hooked_act),
        nn.Sequential(backward_hooked, nn.SiLU()),
    )
    x = torch.randn(2, 4, 3, 3)
    before = model(x)
    assert fuse_group_norm_silu(model) == 0
    calls.clear()
    torch.testing.assert_close(model(x), before)
    assert calls == ["norm", "act"] and type(model[4][0]) is nn.GroupNorm


def test_fuse_helper_keeps_the_norms_parameters_shared_and_frozen():
    """The fused modules hold the norms' own parameters: a norm used twice stays
    one module with one set of parameters, a frozen one stays frozen, a non-affine
    one stays non-affine, and an optimizer built before fusing still trains them
    (before, each pair got copies: sharing broken, requires_grad reset)."""
    shared = nn.GroupNorm(2, 4)
    frozen = nn.GroupNorm(2, 4)
    frozen.requires_grad_(False)
    model = nn.Sequential(
        nn.Conv2d(4, 4, 1), shared, nn.SiLU(), nn.Conv2d(4, 4, 1), shared, nn.SiLU(),
        frozen, nn.SiLU(), nn.GroupNorm(2, 4, affine=False), nn.SiLU(),
    )
    params = list(model.parameters())
    optimizer = torch.optim.SGD(params, lr=0.1)
    x = torch.randn(2, 4, 3, 3)
    before = model(x)
    assert fuse_group_norm_silu(model) == 4
    assert model[1] is model[4] and isinstance(model[1], GroupNormSiLU)
    assert all(a is b for a, b in zip(model.parameters(), params)) and len(list(model.parameters())) == len(params)
    assert not model[6].weight.requires_grad and model[8].weight is None and not model[8].affine
    torch.testing.assert_close(model(x), before)
    model(x).square().sum().backward()
    optimizer.step()
    assert not torch.equal(model[1].weight, torch.ones(4))  # trained through the fused op
    assert torch.equal(model[6].weight, torch.ones(4)) and model[6].weight.grad is None


def _freeze_as_buffers(norm: nn.GroupNorm) -> nn.GroupNorm:
    """``norm`` with its weight and bias made buffers: a legal way to freeze them."""
    weight, bias = norm.weight.detach().clone(), norm.bias.detach().clone()
    del norm.weight, norm.bias
    norm.register_buffer("weight", weight)
    norm.register_buffer("bias", bias)
    return norm


def test_fuse_helper_takes_a_norm_frozen_as_buffers():
    """nn.GroupNorm reads its weights as buffers alike; fusing one raised torch's
    TypeError after the pairs before it were fused."""
    torch.manual_seed(0)
    frozen = _freeze_as_buffers(nn.GroupNorm(2, 4))
    with torch.no_grad():
        frozen.weight.uniform_(0.5, 1.5), frozen.bias.uniform_(-0.5, 0.5)
    model = nn.Sequential(nn.Conv2d(4, 4, 1), nn.GroupNorm(2, 4), nn.SiLU(), nn.Conv2d(4, 4, 1), frozen, nn.SiLU())
    x = torch.randn(2, 4, 3, 3)
    before, keys = model(x), list(model.state_dict())
    assert fuse_group_norm_silu(model) == 2
    assert model[4].weight is frozen.weight and "weight" in model[4]._buffers and not list(model[4].parameters())
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(model(x), before)


def test_fuse_helper_that_fails_leaves_the_model_as_it_was():
    """A norm whose weight is neither a parameter nor a buffer is refused before
    any pair is replaced: the model was left half fused."""
    odd = nn.GroupNorm(2, 4)
    del odd.weight
    odd.weight = torch.ones(4).tolist()  # a plain attribute
    model = nn.Sequential(nn.GroupNorm(2, 4), nn.SiLU(), odd, nn.SiLU())
    with pytest.raises(TypeError, match="weight is neither a parameter nor a buffer"):
        fuse_group_norm_silu(model)
    assert [type(m) for m in model] == [nn.GroupNorm, nn.SiLU, nn.GroupNorm, nn.SiLU]


def test_module_takes_group_norms_bias_flag_and_refuses_a_parametrized_norm():
    """nn.GroupNorm(bias=False) (newer torch) has no counterpart here before
    (a TypeError), and from_group_norm of a parametrized norm failed inside
    nn.Module's attribute assignment."""
    import torch.nn.utils.parametrize as parametrize

    fused = GroupNormSiLU(2, 4, bias=False)
    assert fused.bias is None and list(fused.state_dict()) == ["weight"]
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(fused(x), F.silu(F.group_norm(x, 2, fused.weight)))

    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    norm = nn.GroupNorm(2, 4)
    parametrize.register_parametrization(norm, "weight", Double())
    with pytest.raises(TypeError, match="weight or bias is parametrized"):
        GroupNormSiLU.from_group_norm(norm)


def test_from_group_norm_keeps_the_norms_mode_and_affine():
    """An eval norm gives an eval module, and the fusing helper's Identity takes
    the SiLU's mode (it was left training in an eval model)."""
    norm = nn.GroupNorm(2, 4).eval()
    fused = GroupNormSiLU.from_group_norm(norm)
    assert fused.training is False and fused.affine is True
    assert GroupNormSiLU.from_group_norm(nn.GroupNorm(2, 4, affine=False)).affine is False
    model = nn.Sequential(nn.GroupNorm(2, 4), nn.SiLU()).eval()
    assert fuse_group_norm_silu(model) == 1 and not model[0].training and not model[1].training


def test_fuse_helper_leaves_a_norm_with_a_backward_pre_hook_alone():
    norm = nn.GroupNorm(2, 4)
    norm.register_full_backward_pre_hook(lambda *args: None)
    model = nn.Sequential(norm, nn.SiLU())
    assert fuse_group_norm_silu(model) == 0 and model[0] is norm


def test_from_group_norm_keeps_the_norms_eps():
    """A large eps (0.5) against inputs of variance ~0.01: normalizing with
    another eps changes the output by far more than rounding (the diffusers
    comparisons that would also see it skip without diffusers)."""
    norm = nn.GroupNorm(2, 4, eps=0.5)
    fused = GroupNormSiLU.from_group_norm(norm, backend="reference")
    x = 0.1 * torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    mean, var = x.view(2, 2, -1).mean(-1), x.view(2, 2, -1).var(-1, unbiased=False)
    normed = (x.view(2, 2, -1) - mean[..., None]) / (var[..., None] + 0.5).sqrt()
    assert fused.eps == 0.5
    torch.testing.assert_close(fused(x), F.silu(normed.view(2, 4, 3, 3)))


def test_from_group_norm_without_act_is_the_group_norm_itself():
    gn = torch.nn.GroupNorm(2, 6)
    with torch.no_grad():
        gn.weight.uniform_(-1, 1), gn.bias.uniform_(-1, 1)
    fused = GroupNormSiLU.from_group_norm(gn, act=False, backend="reference")
    x = torch.randn(3, 6, 5, 5)
    assert fused.act is False and fused.backend == "reference"
    with torch.no_grad():
        torch.testing.assert_close(fused(x), gn(x))
