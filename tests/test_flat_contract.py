"""The engine's adapters are one flat (n_adapters, P) buffer end to end: every multi-tensor kernel
receives that buffer plus the layout's group offsets, and no P-sized index tensor is ever made
(an int64 per adapter element would be 1.1 GB for Qwen2.5-0.5B at rank 256)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import perk_kernels
from perk import PerkConfig, PerkModel
from tests.tiny_models import tiny_model_and_tokenizer

PROBLEMS = [
    {"context": "Mary went to the kitchen. John moved to the garden.", "question": "Where is Mary?", "answer": "kitchen"},
    {"context": ["Sandra took the apple.", "She went to the office."], "question": "Who?", "answer": "Sandra"},
]


@pytest.fixture(autouse=True)
def _torch_kernels(monkeypatch):
    monkeypatch.setenv("PERK_KERNELS_BACKEND", "torch")


class LargestIntegerTensor(TorchDispatchMode):
    """Records the largest integer tensor any op returns inside the block."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and not t.is_floating_point() and t.dtype != torch.bool:
                self.largest = max(self.largest, t.numel())
        return out


def make_perk(**overrides):
    model, tokenizer = tiny_model_and_tokenizer("llama")
    settings = dict(rank=8, segment_len=16, inner_steps=2, unroll_steps=2, inner_max_grad_norm=0.5)
    settings.update(overrides)
    return PerkModel.from_base(model, tokenizer, PerkConfig(**settings))


@pytest.mark.parametrize("mode", ["fd", "exact", "first_order"])
def test_no_p_sized_integer_tensor_is_made(mode):
    with LargestIntegerTensor() as watch:
        perk = make_perk(meta_grad=mode, token_weighting=True)
        perk.encode([p["context"] for p in PROBLEMS])
        perk.meta_gradient(PROBLEMS)
    n_params = perk.layout.n_params
    # the largest integer tensors are token ids and chunk tables, far below P here
    assert 0 < watch.largest < n_params // 10, (watch.largest, n_params)
    held = [t for t in vars(perk).values() if isinstance(t, torch.Tensor) and not t.is_floating_point()]
    held += [t for t in vars(perk.adapted).values() if isinstance(t, torch.Tensor) and not t.is_floating_point()]
    assert all(t.numel() < n_params for t in held)


def spy_on_kernels(monkeypatch) -> list:
    """The (name, args) of every call of the multi-tensor kernels, from now on."""
    calls = []

    def spy(name, kernel):
        def wrapped(*args, **kwargs):
            calls.append((name, args))
            return kernel(*args, **kwargs)

        monkeypatch.setattr(perk_kernels, name, wrapped)

    spy("lora_inner_step", perk_kernels.lora_inner_step)
    spy("meta_grad_accumulate", perk_kernels.meta_grad_accumulate)
    return calls


def test_kernels_receive_the_flat_buffer_and_the_group_offsets(monkeypatch):
    perk = make_perk(meta_grad="fd")
    calls = spy_on_kernels(monkeypatch)
    perk.meta_gradient(PROBLEMS)
    check_flat_calls(perk, calls, steps=2, n_adapters=len(PROBLEMS))


def check_flat_calls(perk, calls, steps, n_adapters):
    names = [name for name, _ in calls]
    assert names.count("lora_inner_step") == steps and names.count("meta_grad_accumulate") == steps
    flat_shape = (n_adapters, perk.layout.n_params)
    for name, args in calls:
        buffers = [a for a in args if isinstance(a, torch.Tensor) and a.dim() == 2 and a.shape[1] > perk.layout.n_groups]
        assert buffers and all(tuple(b.shape) == flat_shape for b in buffers), name
        assert list(args[-1]) == list(perk.layout.offsets), name


@pytest.mark.interpreter
def test_the_triton_path_keeps_the_contract(monkeypatch):
    """Both checks above on the Triton kernels (the interpreter on CPU), in one meta-gradient of one
    problem and one unrolled inner step (every kernel runs; more would only repeat them): what is
    watched is perk's host code that prepares the launches, not the interpreter's simulation of a
    GPU program's block-sized index vectors, which a GPU never allocates."""
    from torch.utils._python_dispatch import _disable_current_modes
    from triton.runtime.interpreter import GridExecutor

    monkeypatch.setenv("PERK_KERNELS_BACKEND", "triton")
    launches, launch = [], GridExecutor.__call__

    def unwatched(self, *args, **kwargs):
        launches.append(self)
        with _disable_current_modes():
            return launch(self, *args, **kwargs)

    monkeypatch.setattr(GridExecutor, "__call__", unwatched)
    calls = spy_on_kernels(monkeypatch)
    with LargestIntegerTensor() as watch:
        perk = make_perk(meta_grad="fd", inner_steps=1, unroll_steps=1)
        perk.meta_gradient(PROBLEMS[:1])
    assert launches, "the Triton kernels ran"
    assert 0 < watch.largest < perk.layout.n_params // 10, (watch.largest, perk.layout.n_params)
    check_flat_calls(perk, calls, steps=1, n_adapters=1)
