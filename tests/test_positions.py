"""Rotary positions (RoPE) in TinyTransformer: each query/key pair turned by its position's angle, so
that attention reads distances; a bidirectional model reads word order from its first step."""

import math

import pytest
import torch

from dlm.core.nets import TinyTransformer, rotary_angles, rotate


def test_rotate_turns_each_pair_by_position_times_frequency():
    """Oracle: the pair (x_i, x_{i+h/2}) as the complex number x_i + i x_{i+h/2}, multiplied by
    exp(i * position * base^(-i / (h/2)))."""
    head = 8
    x = torch.randn(1, 1, 5, head, dtype=torch.float64)
    positions = torch.tensor([0, 1, 2, 7, 30])
    turned = rotate(x, tuple(a.double() for a in rotary_angles(positions, head)))
    for row, p in enumerate(positions.tolist()):
        for i in range(head // 2):
            z = complex(x[0, 0, row, i], x[0, 0, row, i + head // 2])
            expected = z * complex(math.cos(p * 10000 ** (-i / (head // 2))), math.sin(p * 10000 ** (-i / (head // 2))))
            assert turned[0, 0, row, i].item() == pytest.approx(expected.real, abs=1e-6)
            assert turned[0, 0, row, i + head // 2].item() == pytest.approx(expected.imag, abs=1e-6)


def test_rotary_attention_reads_distances_not_places():
    """The same window at positions 0..L-1 and 5..L+4 gives the same outputs with rotary positions
    (only distances enter attention); with a learned table it does not."""
    x = torch.randn(2, 10, 8)
    shifted = torch.arange(5, 15)
    for positions, same in (("rotary", True), ("learned", False)):
        torch.manual_seed(0)
        model = TinyTransformer(8, 16, 2, 2, 16, dropout=0.0, time_conditioned=False, positions=positions).eval()
        with torch.no_grad():
            if positions == "learned":
                model.positions.normal_()
            moved = torch.allclose(model(x), model(x, positions=shifted), atol=1e-5)
        assert moved == same, positions


def test_rotary_positions_alone_tell_a_window_from_its_reverse():
    """Without positions a bidirectional transformer is permutation-equivariant: reversing the
    window reverses its outputs (the control, a learned table set to zero). Rotary attention with
    no table at all still tells the two apart."""
    x = torch.randn(1, 12, 8, generator=torch.Generator().manual_seed(1))
    gaps = {}
    for positions in ("learned", "rotary"):
        torch.manual_seed(0)
        model = TinyTransformer(8, 16, 2, 2, 12, dropout=0.0, time_conditioned=False, positions=positions).eval()
        with torch.no_grad():
            if positions == "learned":
                model.positions.zero_()
            forward, backward = model(x), model(x.flip(1)).flip(1)
        gaps[positions] = float((forward - backward).abs().max() / forward.abs().max())
    assert gaps["learned"] < 1e-5
    assert gaps["rotary"] > 1e-3


def test_rotary_positions_need_an_even_head_size():
    with pytest.raises(ValueError, match="even head size"):
        TinyTransformer(8, 12, 1, 4, 8, positions="rotary")
