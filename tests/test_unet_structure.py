"""The U-Net's structure where the fused-vs-reference comparisons cannot see
it (both paths share it): the presets' architecture, the ResBlock's order of
layers in training, gradients through every path, and the modules' modes.
Each test failed on a mutant that every other test passed."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ddpm_fast.models import UNet
from ddpm_fast.models.layers import ResBlock, timestep_embedding
from ddpm_fast.nn import GroupNormSiLU
from test_unet import MINI, inputs, randomize


def test_presets_keep_their_documented_architecture():
    """README: small is ch 64, mult (1, 2, 2), 6.5M parameters; tiny 0.18M."""
    small, tiny = UNet.small(), UNet.tiny()
    assert (small.config["ch"], small.config["ch_mult"], small.config["attn_resolutions"]) == (64, [1, 2, 2], [16])
    assert (tiny.config["ch"], tiny.config["ch_mult"], tiny.config["attn_resolutions"]) == (16, [1, 2], [4])
    assert sum(p.numel() for p in small.parameters()) == 6_472_195
    assert sum(p.numel() for p in tiny.parameters()) == 176_849


def test_resblock_drops_out_between_the_second_norm_and_its_conv():
    """Ho et al.'s resnet_block: GN+SiLU, conv, + temb, GN+SiLU, dropout, conv
    (dropout after the last conv passed: no other test trains with dropout)."""
    block = randomize(ResBlock(8, 8, 16, dropout=0.5, num_groups=4, eps=1e-6, reference=True, backend="auto")).train()
    g = torch.Generator().manual_seed(0)
    x, temb = torch.randn(2, 8, 6, 6, generator=g), torch.randn(2, 16, generator=g)
    torch.manual_seed(3)
    got = block(x, temb)
    torch.manual_seed(3)
    h = block.conv1(F.silu(F.group_norm(x, 4, block.norm1.weight, block.norm1.bias, 1e-6)))
    h = h + block.temb_proj(temb)[:, :, None, None]
    h = F.silu(F.group_norm(h, 4, block.norm2.weight, block.norm2.bias, 1e-6))
    want = x + block.conv2(F.dropout(h, 0.5, training=True))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_gradients_reach_the_input_through_every_path():
    """Float64 gradcheck of the reference path with respect to x: a skip
    connection kept without its gradient (h.detach()) passed the fused-vs-
    reference gradient comparisons, which share it."""
    model = randomize(UNet(**MINI, reference=True)).double().eval()
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    t = torch.tensor([321])
    assert torch.autograd.gradcheck(lambda v: model(v, t), (x,), fast_mode=True)


def test_a_fused_norm_keeps_the_mode_of_the_norm_it_replaces():
    for training in (True, False):
        assert GroupNormSiLU.from_group_norm(nn.GroupNorm(2, 4).train(training)).training is training


def test_timestep_embedding_values_for_an_odd_width():
    """[sin(t f_i), cos(t f_i)] with f_i = 10000^(-i/(half-1)), then one zero (not
    at the front); checked without diffusers, whose comparisons skip without it."""
    t = torch.tensor([0.0, 3.0, 999.0])
    got = timestep_embedding(t, 7)  # half = 3: f = 1, 10000^-0.5, 10000^-1
    freqs = [1.0, 0.01, 1e-4]
    want = torch.tensor([[math.sin(v * f) for f in freqs] + [math.cos(v * f) for f in freqs] + [0.0] for v in t.tolist()])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dim", [2, 3, 0, 4.0, True])
def test_timestep_embedding_needs_two_frequencies(dim):
    """dim 2 or 3 has one frequency, and its exponent divided by half - 1 = 0: NaN."""
    with pytest.raises(ValueError, match=r"dim must be an int >= 4 \(two frequencies at least\)"):
        timestep_embedding(torch.tensor([0.0, 5.0]), dim)


def test_a_float_timestep_is_not_truncated():
    """A Python float t (DDIM-style fractional steps) must mean the same as a float tensor, not int(t)."""
    model = randomize(UNet(**MINI)).eval()
    x, _ = inputs()
    with torch.no_grad():
        got = model(x, 2.5)
        assert torch.equal(got, model(x, torch.full((4,), 2.5)))
        assert not torch.equal(got, model(x, 2))


def test_every_norm_of_the_unet_runs_the_backend_asked_for():
    """backend= reached the ResBlocks' and the output norm's GroupNormSiLU only
    by name: on the CPU 'auto' gives the same numbers, so a lost backend showed
    in no output."""
    for backend in ("reference", "cpu", "triton"):
        norms = [m for m in UNet.tiny(backend=backend).modules() if isinstance(m, GroupNormSiLU)]
        assert norms and {m.backend for m in norms} == {backend}


def test_every_bias_starts_at_zero_and_attention_as_the_identity():
    """The init zeroes the biases of convolutions and linear layers alike, and
    the attention's output projection's weights nearly: each attention block
    starts as the identity (only conv_in's bias was checked)."""
    model = UNet.tiny()
    biases = {name: p for name, p in model.named_parameters() if name.endswith(".bias")
              and isinstance(model.get_submodule(name.rsplit(".", 1)[0]), (nn.Conv2d, nn.Linear))}
    assert biases and all(torch.count_nonzero(p) == 0 for p in biases.values()), \
        [n for n, p in biases.items() if torch.count_nonzero(p)]
    attn = model.mid.attn
    x = torch.randn(2, attn.proj_out.in_features, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(attn(x), x, rtol=0, atol=1e-3)  # proj_out's weights: gain 1e-5, not 0
