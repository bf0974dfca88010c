"""Verification: the longest agreeing beam, its bonus token and path, by both ways of computing it."""

from __future__ import annotations

import pytest
import torch

from redrafter.tree import PAD, build_tree
from redrafter.verify import verify, verify_on_device, verify_on_host


def test_the_longest_agreeing_beam_wins_and_the_first_among_equals():
    beams = torch.tensor([[[1, 2, 3], [1, 2, 4], [1, 5, 6]]])  # slots: 1 | 2 | 3 | 4 | 5 6
    tree = build_tree(beams)
    # The target follows 1 -> 2 -> 4 -> 8: beam 1 is accepted whole, and 8 is the bonus.
    choice = torch.tensor([[2, 4, 9, 8, 7, 7]])
    for check in (verify, verify_on_host, verify_on_device):
        verdict = check(beams, tree.node_index, choice)
        assert verdict.num_tokens.tolist() == [3]
        assert verdict.tokens.tolist() == [[2, 4, 8]]
        assert verdict.path.tolist() == [[0, 1, 3]]
    # Beams 0 and 1 both accept one token (2): the first of them is taken, its bonus the choice after 2.
    choice = torch.tensor([[2, 7, 9, 8, 7, 7]])
    for check in (verify, verify_on_host, verify_on_device):
        verdict = check(beams, tree.node_index, choice)
        assert verdict.tokens.tolist() == [[2, 7, 7]] and verdict.path.tolist() == [[0, 1, 1]]


@pytest.mark.parametrize("seed", range(40))
def test_host_and_device_give_the_same_verdict(seed):
    """Random beams over 3 tokens (shared prefixes, ties between beams), PAD tails, target choices drawn
    from the same 3 tokens so that long acceptances are common."""
    generator = torch.Generator().manual_seed(seed)
    batch, width, length = 3, 5, 5
    beams = torch.randint(0, 3, (batch, width, length), generator=generator)
    beams[:, :, 0] = beams[:, :1, 0]
    real = torch.randint(1, length + 1, (batch, width), generator=generator)
    beams[torch.arange(length)[None, None, :] >= real[:, :, None]] = PAD
    tree = build_tree(beams)
    choice = torch.randint(0, 3, tree.tokens.shape, generator=generator)
    host, device = verify_on_host(beams, tree.node_index, choice), verify_on_device(beams, tree.node_index, choice)
    for name in ("tokens", "num_tokens", "path"):
        assert torch.equal(getattr(host, name), getattr(device, name)), name
        assert getattr(host, name).dtype == getattr(device, name).dtype, name
