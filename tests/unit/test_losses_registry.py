"""The divergence registry and its error messages."""

from __future__ import annotations

import inspect

import pytest
import torch

import raykd.losses as losses
from raykd.losses import (
    OBJECTIVES,
    TOPK_OBJECTIVES,
    build_objective,
    get_divergence,
    objective_params,
)

NAMES = {
    "forward_kl",
    "reverse_kl",
    "jsd",
    "skew_forward_kl",
    "skew_reverse_kl",
    "tvd",
    "cross_entropy",
}


def test_registry_names():
    assert set(OBJECTIVES) == NAMES
    assert set(TOPK_OBJECTIVES) == NAMES
    assert get_divergence("jsd") is losses.jsd
    assert get_divergence("jsd", topk_targets=True) is losses.topk_jsd
    assert objective_params("jsd") == {
        "beta": 0.5,
        "temperature": 1.0,
        "chunk_size": losses.DEFAULT_CHUNK_SIZE,
    }


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown divergence 'kld'.*forward_kl.*reverse_kl"):
        get_divergence("kld")
    with pytest.raises(ValueError, match="unknown divergence 'kld'"):
        build_objective("kld")


def test_bad_parameter_names_parameter_and_objective():
    with pytest.raises(ValueError, match=r"objective 'jsd' has no parameter 'lam'.*beta"):
        build_objective("jsd", lam=0.1)
    with pytest.raises(ValueError, match=r"objective 'forward_kl' has no parameter 'beta'"):
        build_objective("forward_kl", beta=0.5)
    with pytest.raises(ValueError, match=r"objective 'tvd' has no parameter 'mask'"):
        build_objective("tvd", mask=None)


def test_build_objective_binds_parameters():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 3, 7, generator=g), torch.randn(2, 3, 7, generator=g)
    mask = torch.ones(2, 3)
    fn = build_objective("skew_reverse_kl", lam=0.2, temperature=2.0)
    want = losses.skew_reverse_kl(student, teacher, mask, lam=0.2, temperature=2.0)
    torch.testing.assert_close(fn(student, teacher, mask), want)
    lp, ix = torch.log_softmax(teacher, -1).topk(3, dim=-1)
    fn = build_objective("jsd", topk_targets=True, beta=0.1)
    torch.testing.assert_close(
        fn(student, lp, ix, mask), losses.topk_jsd(student, lp, ix, mask, beta=0.1)
    )


def test_every_public_function_states_a_formula():
    for name in losses.__all__:
        obj = getattr(losses, name)
        if inspect.isfunction(obj) or inspect.isclass(obj):
            assert obj.__doc__ and len(obj.__doc__.strip()) > 20, name
