"""Everyday training-loop patterns inside and around ``acc.microbatch(...)`` (issue #12).

Each test fails without the fix it names: the pattern either gives exactly what plain PyTorch
gives (or the reference), or a clear error before anything is touched, with every ``p.grad``
as it was before the microbatch.
"""

from __future__ import annotations

import copy
import io
import pickle
import threading
import warnings

import pytest
import torch
from conftest import ToyLM, row_microbatches, toy_sequence_losses
from torch import nn

from proma_accum import IncompleteSequenceDataError, ProjectedAccumulator
from proma_accum.testing import assert_grads_close, reference_accumulate


@pytest.fixture
def model():
    torch.manual_seed(0)
    return ToyLM()


@pytest.fixture
def mbs(gen):
    return row_microbatches(gen, 3, rows=4, length=5, vocab=23)


def _run(acc, model, mb):
    with acc.microbatch(mb["seq_ids"]):
        toy_sequence_losses(model, mb).sum().backward()


def _grads(model):
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def _assert_unchanged(model, before):
    for n, p in model.named_parameters():
        if before[n] is None:
            assert p.grad is None, n
        else:
            assert torch.equal(p.grad, before[n]), n


def _assert_equal_grads(model, other):
    for (n, p), q in zip(model.named_parameters(), other.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), n


# ----------------------------------------------------------------- 1. autograd.grad inside
def test_autograd_grad_inside_microbatch_is_plain_and_touches_nothing(model, mbs):
    """``autograd.grad`` on the parameters inside a microbatch (gradient-norm logging, a
    gradient penalty) returns what it returns without the accumulator and leaves ``p.grad``
    alone; the microbatch's own backward is unaffected."""
    twin, plain = copy.deepcopy(model), copy.deepcopy(model)
    params = list(model.parameters())
    with ProjectedAccumulator(model) as acc, ProjectedAccumulator(twin) as acc_twin:
        for mb in mbs[:2]:
            _run(acc, model, mb)
            _run(acc_twin, twin, mb)
        before = _grads(model)
        with acc.microbatch(mbs[2]["seq_ids"]):
            loss = toy_sequence_losses(model, mbs[2]).sum()
            got = torch.autograd.grad(loss, params, retain_graph=True)
            _assert_unchanged(model, before)
            # differentiable, as without the accumulator (a gradient penalty's first half)
            got2 = torch.autograd.grad(loss, params, retain_graph=True, create_graph=True)
            _assert_unchanged(model, before)
            loss.backward()
        _run(acc_twin, twin, mbs[2])
    want = torch.autograd.grad(toy_sequence_losses(plain, mbs[2]).sum(), list(plain.parameters()))
    for g, g2, w in zip(got, got2, want, strict=True):
        assert torch.equal(g, w)
        assert torch.equal(g2.detach(), w)
    assert all(g.requires_grad for g in got2)
    _assert_equal_grads(model, twin)


def test_autograd_grad_on_an_activation_then_backward(model, mbs):
    """The output gradients that ``autograd.grad`` sends through covered layers are not counted
    again in the microbatch's backward (it raised a false IncompleteSequenceDataError)."""
    twin = copy.deepcopy(model)

    def losses_and_hidden(m, mb):
        h = torch.tanh(m.proj(m.embed(mb["input_ids"])))
        h2 = m.rms(m.ln(h))
        logits = m.head(h2 + torch.tanh(m.conv(h2)))
        loss = nn.functional.cross_entropy(
            logits.transpose(1, 2), mb["targets"], ignore_index=-100, reduction="sum"
        )
        return loss, h

    with ProjectedAccumulator(model) as acc, ProjectedAccumulator(twin) as acc_twin:
        for mb in mbs[:2]:
            _run(acc, model, mb)
            _run(acc_twin, twin, mb)
        with acc.microbatch(mbs[2]["seq_ids"]):
            loss, h = losses_and_hidden(model, mbs[2])
            torch.autograd.grad(loss, h, retain_graph=True)
            loss.backward()
        with acc_twin.microbatch(mbs[2]["seq_ids"]):
            losses_and_hidden(twin, mbs[2])[0].backward()
    _assert_equal_grads(model, twin)


# ----------------------------------------------------------------- 3. detach inside
def test_detach_inside_microbatch_is_refused_and_restores(model, mbs):
    with ProjectedAccumulator(model) as acc:
        _run(acc, model, mbs[0])
        before = _grads(model)
        with pytest.raises(RuntimeError, match=r"detach\(\) inside"):
            with acc.microbatch(mbs[1]["seq_ids"]):
                toy_sequence_losses(model, mbs[1]).sum().backward()
                acc.detach()
        _assert_unchanged(model, before)
        assert acc.attached
        _run(acc, model, mbs[1])
        assert acc.stats()["microbatch"]["all"]["updates"] > 0


# ----------------------------------------------------------------- 4. stale coverage
def test_unfrozen_after_construction_is_projected(mbs):
    """Staged unfreezing: a tensor frozen at construction and unfrozen later is projected."""
    torch.manual_seed(0)
    model = ToyLM()
    model.proj.weight.requires_grad_(False)
    acc = ProjectedAccumulator(model)
    assert "proj.weight" not in acc.projected_parameters()
    model.proj.weight.requires_grad_(True)
    expected = reference_accumulate(model, mbs, toy_sequence_losses)
    with acc:
        for mb in mbs:
            _run(acc, model, mb)
    assert "proj.weight" in acc.projected_parameters()
    assert_grads_close(model, expected, rtol=2e-5, atol=1e-7)


def test_frozen_while_attached_is_rediscovered(mbs):
    torch.manual_seed(0)
    model = ToyLM()
    with ProjectedAccumulator(model) as acc:
        _run(acc, model, mbs[0])
        model.proj.weight.requires_grad_(False)
        model.proj.weight.grad = None
        _run(acc, model, mbs[1])
        assert "proj.weight" not in acc.projected_parameters()
        assert model.proj.weight.grad is None


def test_parameters_replaced_by_load_state_dict_assign(mbs):
    torch.manual_seed(0)
    model = ToyLM()
    acc = ProjectedAccumulator(model)
    torch.manual_seed(1)
    model.load_state_dict(ToyLM().state_dict(), assign=True)
    expected = reference_accumulate(model, mbs, toy_sequence_losses)
    with acc:
        for mb in mbs:
            _run(acc, model, mb)
    assert_grads_close(model, expected, rtol=2e-5, atol=1e-7)


def test_model_moved_after_construction(mbs):
    torch.manual_seed(0)
    model = ToyLM()
    acc = ProjectedAccumulator(model)
    model.double()
    expected = reference_accumulate(model, mbs, toy_sequence_losses)
    with acc:
        for mb in mbs:
            _run(acc, model, mb)
    assert all(p.grad.dtype == torch.float64 for p in model.parameters())
    assert_grads_close(model, expected, rtol=1e-9, atol=1e-12)
    # another device: the message names the device the parameters are on now
    model.to("meta")
    with acc, pytest.raises(ValueError, match="parameters are on meta"):
        with acc.microbatch(torch.arange(4)):
            pass


# ----------------------------------------------------------------- 5. what the fused path sees
def _double(module, args, output):
    return 2 * output


def _hook_global(m):
    def double_proj(module, args, output):
        return 2 * output if module is m.proj else None

    return nn.modules.module.register_module_forward_hook(double_proj)


def _hook_prepend(m):
    return m.proj.register_forward_hook(_double, prepend=True)


def _hook_after(m):
    return m.proj.register_forward_hook(_double)


def _hook_pre(m):
    return m.proj.register_forward_pre_hook(lambda mod, args: (2 * args[0],))


class _Patch:
    def __init__(self, m):
        self.m = m
        forward = m.proj.forward
        m.proj.forward = lambda x: 2 * forward(x)

    def remove(self):
        del self.m.proj.forward


@pytest.mark.parametrize(
    "hook",
    [_hook_global, _hook_prepend, _hook_after, _hook_pre, _Patch],
    ids=["global-hook", "prepend-hook", "later-hook", "pre-hook", "patched-forward"],
)
def test_output_changed_by_hooks_the_fused_path_cannot_see(mbs, hook):
    """A layer's output changed after attach by a hook or a patched ``forward``: the result is
    the reference's (computed with the same change), or the microbatch raises and restores."""
    torch.manual_seed(0)
    model = ToyLM()
    with ProjectedAccumulator(model) as acc:
        handle = hook(model)
        try:
            expected = reference_accumulate(model, mbs, toy_sequence_losses)
            _run(acc, model, mbs[0])
            for mb in mbs[1:]:
                before = _grads(model)
                try:
                    _run(acc, model, mb)
                except IncompleteSequenceDataError as error:
                    assert "proj" in str(error)
                    _assert_unchanged(model, before)
                    return
        finally:
            handle.remove()
    assert_grads_close(model, expected, rtol=2e-5, atol=1e-7)


# ----------------------------------------------------------------- 6. parameter hooks
def test_parameter_hook_after_attach_acts_on_the_microbatch_gradient(mbs):
    torch.manual_seed(0)
    model = ToyLM()
    plain = copy.deepcopy(model)
    seen = []
    with ProjectedAccumulator(model, strength=0.0) as acc:
        model.proj.weight.register_hook(lambda g: 0.5 * g)
        model.proj.bias.register_hook(lambda g: seen.append(g.clone()))
        for mb in mbs:
            _run(acc, model, mb)
    plain.proj.weight.register_hook(lambda g: 0.5 * g)
    for mb in mbs:
        toy_sequence_losses(plain, mb).sum().backward()
        # a hook sees the microbatch's gradient, not the running one
        assert torch.equal(seen.pop(0), _plain_bias_grad(plain, mb))
    _assert_equal_grads(model, plain)


def _plain_bias_grad(m, mb):
    return torch.autograd.grad(toy_sequence_losses(m, mb).sum(), m.proj.bias)[0]


def test_parameter_hook_that_changes_a_projected_gradient_is_named(mbs):
    torch.manual_seed(0)
    model = ToyLM()

    def halve(g):
        return 0.5 * g

    model.proj.weight.register_hook(halve)
    with ProjectedAccumulator(model) as acc:
        _run(acc, model, mbs[0])
        before = _grads(model)
        with pytest.raises(IncompleteSequenceDataError, match=r"proj\.weight(.|\n)*halve"):
            _run(acc, model, mbs[1])
        _assert_unchanged(model, before)


def test_parameter_hook_that_only_reads_is_fine(mbs):
    torch.manual_seed(0)
    model = ToyLM()
    expected = reference_accumulate(model, mbs, toy_sequence_losses)
    norms = []
    model.proj.weight.register_hook(lambda g: norms.append(float(g.norm())))
    with ProjectedAccumulator(model) as acc:
        model.head.weight.register_hook(lambda g: norms.append(float(g.norm())))
        for mb in mbs:
            _run(acc, model, mb)
    assert len(norms) == 2 * len(mbs)
    assert_grads_close(model, expected, rtol=2e-5, atol=1e-7)


# ----------------------------------------------------------------- 7. threads
def _in_thread(fn):
    errors = []

    def target():
        try:
            fn()
        except BaseException as error:  # handed to the test
            errors.append(error)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    return errors


@pytest.mark.parametrize("graph", ["built-inside", "built-before"])
def test_backward_from_another_thread_during_a_microbatch_raises(model, mbs, graph):
    twin = copy.deepcopy(model)
    other = mbs[0]
    with ProjectedAccumulator(model) as acc, ProjectedAccumulator(twin) as acc_twin:
        _run(acc, model, mbs[0])
        _run(acc_twin, twin, mbs[0])
        early = toy_sequence_losses(model, other).sum() if graph == "built-before" else None
        with acc.microbatch(mbs[1]["seq_ids"]):
            loss = toy_sequence_losses(model, mbs[1]).sum()
            if early is None:
                errors = _in_thread(lambda: toy_sequence_losses(model, other).sum().backward())
            else:
                errors = _in_thread(early.backward)
            assert len(errors) == 1 and isinstance(errors[0], RuntimeError)
            assert "thread" in str(errors[0])
            loss.backward()
        _run(acc_twin, twin, mbs[1])
    _assert_equal_grads(model, twin)


# ----------------------------------------------------------------- 8. backward after the context
def test_backward_after_the_context_raises_and_exit_warns(model, mbs):
    with ProjectedAccumulator(model) as acc:
        with pytest.warns(UserWarning, match="no backward"):
            with acc.microbatch(mbs[0]["seq_ids"]):
                loss = toy_sequence_losses(model, mbs[0]).sum()
        loss.backward()  # nothing to project yet: plain, as the microbatch would have been
        before = _grads(model)
        with pytest.warns(UserWarning, match="no backward"):
            with acc.microbatch(mbs[1]["seq_ids"]):
                loss = toy_sequence_losses(model, mbs[1]).sum()
        with pytest.raises(RuntimeError, match="after its acc.microbatch"):
            loss.backward()
        _assert_unchanged(model, before)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _run(acc, model, mbs[1])


# ----------------------------------------------------------------- 11. create_graph
def test_backward_with_create_graph_is_refused_up_front(model, mbs):
    with ProjectedAccumulator(model) as acc:
        _run(acc, model, mbs[0])
        before = _grads(model)
        with pytest.raises(RuntimeError, match="create_graph=True"):
            with acc.microbatch(mbs[1]["seq_ids"]):
                toy_sequence_losses(model, mbs[1]).sum().backward(create_graph=True)
        _assert_unchanged(model, before)
        _run(acc, model, mbs[1])


# ----------------------------------------------------------------- 12. pickling and copies
def test_saving_an_attached_model_drops_the_hooks(model, mbs):
    with ProjectedAccumulator(model) as acc:
        _run(acc, model, mbs[0])
        buffer = io.BytesIO()
        torch.save(model, buffer)
        pickle.dumps(model)
        copied = copy.deepcopy(model)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        for m in (loaded, copied):  # the copies run plainly, and the accumulator is untouched
            m.zero_grad()
            with acc.microbatch(mbs[1]["seq_ids"]):
                toy_sequence_losses(m, mbs[1]).sum().backward()
            want = torch.autograd.grad(
                toy_sequence_losses(m, mbs[1]).sum(), list(m.parameters()), allow_unused=True
            )
            for p, w in zip(m.parameters(), want, strict=True):
                assert torch.equal(p.grad, w)


def test_accumulator_copy_is_refused(model):
    acc = ProjectedAccumulator(model)
    for attempt in (copy.deepcopy, copy.copy, pickle.dumps):
        with pytest.raises(TypeError, match="cannot be copied"):
            attempt(acc)


# ----------------------------------------------------------------- 13. smaller
def test_step_all_exists_after_a_step_of_one_microbatch(model, mbs):
    with ProjectedAccumulator(model) as acc:
        _run(acc, model, mbs[0])
        stats = acc.stats()
    assert stats["step"]["all"]["updates"] == 0
    assert stats["microbatch"]["all"]["updates"] == 0
    assert "proma/step/all/updates" in acc.stats(flat=True)


def test_exclude_of_the_wrong_type_names_it(model):
    with pytest.raises(TypeError, match="exclude must be"):
        ProjectedAccumulator(model, exclude=5)


def test_advantages_on_another_device_names_it(model):
    with ProjectedAccumulator(model) as acc, pytest.raises(ValueError, match="advantages is on"):
        with acc.microbatch(torch.arange(4), advantages=torch.ones(4, device="meta")):
            pass


def test_consistency_message_says_what_was_observed_and_likely_causes(model, mbs):
    with ProjectedAccumulator(model) as acc:
        _run(acc, model, mbs[0])
        with pytest.raises(IncompleteSequenceDataError) as info:
            with acc.microbatch(mbs[1]["seq_ids"]):
                loss = toy_sequence_losses(model, mbs[1]).sum()
                (loss + model.proj.weight.square().sum()).backward()
    message = str(info.value)
    for cause in ("penalty term", "gradient hook", "forward hook", "patched forward"):
        assert cause in message
