"""Bad input, atomicity on failure, hook lifecycle, fused-head detection."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import ToyLM, row_microbatches, toy_sequence_losses
from torch import nn

from proma_accum import MicrobatchFailedError, ProjectedAccumulator


@pytest.fixture
def model():
    torch.manual_seed(0)
    return ToyLM()


def _hook_count(model):
    total = 0
    for m in model.modules():
        total += len(m._forward_hooks) + len(m._forward_hooks_with_kwargs)
    for p in model.parameters():
        total += len(p._backward_hooks or {})
    return total


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"projection": "qr"}, "projection must be one of"),
        ({"clamp": 0.0}, "clamp must be"),
        ({"clamp": -1.0}, "clamp must be"),
        ({"clamp": float("nan")}, "clamp must be"),
        ({"strength": 1.5}, r"strength must be a number in \[0, 1\]"),
        ({"strength": -0.1}, r"strength must be a number in \[0, 1\]"),
        ({"chunk_bytes": 0}, "chunk_bytes must be a positive int"),
    ],
)
def test_bad_settings(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ProjectedAccumulator(model, **kwargs)


def test_bad_model_and_optimizer():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        ProjectedAccumulator("model")
    with pytest.raises(TypeError, match="optimizer must be a torch optimizer"):
        ProjectedAccumulator(nn.Linear(2, 2), optimizer=object())
    with pytest.raises(TypeError, match="compile must be True or False, got 'yes'"):
        ProjectedAccumulator(nn.Linear(2, 2), compile="yes")


@pytest.mark.parametrize(
    ("seq_ids", "advantages", "exc", "match"),
    [
        ([0, 1, 2, 3], None, TypeError, "seq_ids must be an integer torch.Tensor"),
        (torch.zeros(4), None, TypeError, "seq_ids must have an integer dtype"),
        (torch.zeros(4, 5, 1, dtype=torch.long), None, ValueError, r"shape \(B,\) or \(B, T\)"),
        (torch.tensor([0, 1, -2, 3]), None, ValueError, "seq_ids must be >= -1"),
        (torch.arange(3), None, ValueError, r"does not start with seq_ids shape \(3,\)"),
        (torch.arange(4), torch.ones(3), ValueError, "advantages has length 3"),
        (torch.arange(4), torch.tensor([1.0, float("nan"), 0, 0]), ValueError, "finite"),
        (torch.arange(4), torch.ones(4, dtype=torch.long), TypeError, "1-D float"),
        (torch.arange(4), [1.0] * 4, TypeError, "advantages must be a 1-D float"),
    ],
)
def test_bad_microbatch_input_leaves_grads_untouched(model, gen, seq_ids, advantages, exc, match):
    mbs = row_microbatches(gen, 2, rows=4, length=5, vocab=23)
    with ProjectedAccumulator(model) as acc:
        with acc.microbatch(mbs[0]["seq_ids"]):
            toy_sequence_losses(model, mbs[0]).sum().backward()
        before = {n: p.grad.clone() for n, p in model.named_parameters()}
        with pytest.raises(exc, match=match):
            with acc.microbatch(seq_ids, advantages=advantages):
                toy_sequence_losses(model, mbs[1]).sum().backward()
        for n, p in model.named_parameters():
            assert torch.equal(p.grad, before[n]), n
        # and the next microbatch works
        with acc.microbatch(mbs[1]["seq_ids"]):
            toy_sequence_losses(model, mbs[1]).sum().backward()
        assert acc.stats()["microbatch"]["all"]["updates"] > 0


def test_seq_ids_on_wrong_device(model):
    acc = ProjectedAccumulator(model)
    acc._device = torch.device("meta")  # stands in for "parameters on another device"
    with acc, pytest.raises(ValueError, match="seq_ids is on cpu but the model's parameters"):
        with acc.microbatch(torch.arange(4)):
            pass


@pytest.mark.parametrize("where", ["forward", "backward", "after-backward"])
def test_failure_inside_microbatch_restores_every_grad(model, gen, where):
    # microbatches 0 and 1 succeed (1 is projected), 2 fails, then runs again
    mbs = row_microbatches(gen, 3, rows=4, length=5, vocab=23)
    boom = RuntimeError("boom")

    def fail_in_backward(grad):
        raise boom

    def without_peak(stats: dict) -> dict:  # a peak: the failed attempt's bytes did exist
        return {k: v for k, v in stats.items() if k != "peak_seq_grad_bytes"}

    def run(acc: ProjectedAccumulator, m: nn.Module, mb: dict) -> None:
        with acc.microbatch(mb["seq_ids"]):
            toy_sequence_losses(m, mb).sum().backward()

    twin = copy.deepcopy(model)
    with ProjectedAccumulator(twin) as acc:  # the same microbatches, and no failure
        run(acc, twin, mbs[0])
        run(acc, twin, mbs[1])
        stats = without_peak(acc.stats())
    assert stats["microbatch"]["all"]["updates"] > 0

    with ProjectedAccumulator(model) as acc:
        run(acc, model, mbs[0])
        run(acc, model, mbs[1])
        before = {n: p.grad.clone() for n, p in model.named_parameters()}
        ids = {n: id(p.grad) for n, p in model.named_parameters()}
        with pytest.raises(RuntimeError, match="boom"):
            with acc.microbatch(mbs[2]["seq_ids"]):
                if where == "forward":
                    raise boom
                h = model.embed(mbs[2]["input_ids"])
                if where == "backward":
                    # raises after the head and norms have already accumulated
                    h.register_hook(fail_in_backward)
                loss = toy_sequence_losses(model, mbs[2]).sum() + 0 * h.sum()
                loss.backward()
                if where == "after-backward":
                    raise boom
        for n, p in model.named_parameters():
            assert torch.equal(p.grad, before[n]), n
            assert id(p.grad) == ids[n], n
        # the failed attempt is not counted either, and nothing recorded before it is lost
        assert without_peak(acc.stats()) == stats
        run(acc, model, mbs[2])
        changed = [n for n, p in model.named_parameters() if not torch.equal(p.grad, before[n])]
        assert len(changed) == len(before)


def test_hooks_removed_on_exit_and_on_error(model):
    base = _hook_count(model)
    acc = ProjectedAccumulator(model)
    with acc:
        assert _hook_count(model) > base
    assert _hook_count(model) == base
    with pytest.raises(KeyError), acc:
        raise KeyError("body failed")
    assert _hook_count(model) == base
    assert not acc.attached


def test_lifecycle_errors(model):
    acc = ProjectedAccumulator(model)
    with pytest.raises(RuntimeError, match="needs attached hooks"), acc.microbatch(torch.arange(4)):
        pass
    acc.attach()
    with pytest.raises(RuntimeError, match="already attached"):
        acc.attach()
    with acc.microbatch(torch.arange(4)):
        with pytest.raises(RuntimeError, match="cannot be nested"), acc.microbatch(torch.arange(4)):
            pass
    acc.detach()
    acc.detach()  # idempotent
    assert _hook_count(model) == 0


def test_two_backwards_in_one_microbatch_raise(model, gen):
    mb = row_microbatches(gen, 1, rows=4, length=5, vocab=23)[0]
    with ProjectedAccumulator(model) as acc:
        # caught inside the body: the microbatch still fails at its exit (all-or-nothing)
        with pytest.raises(MicrobatchFailedError), acc.microbatch(mb["seq_ids"]):
            toy_sequence_losses(model, mb).sum().backward()
            with pytest.raises(RuntimeError, match="received gradient twice"):
                toy_sequence_losses(model, mb).sum().backward()
    assert all(p.grad is None for p in model.parameters())


def test_fused_head_is_detected_not_silently_accumulated(gen):
    """The head weight used outside its module's forward (as TRL's fused LM head does)."""
    torch.manual_seed(0)
    model = ToyLM(tied=True)
    mbs = row_microbatches(gen, 2, rows=4, length=5, vocab=23)

    def fused_losses(model, mb):
        h = model.rms(model.ln(torch.tanh(model.proj(model.embed(mb["input_ids"])))))
        h = h + torch.tanh(model.conv(h))
        logits = h @ model.head.weight.T  # the head module never runs
        return torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), mb["targets"], ignore_index=-100, reduction="sum"
        )

    with ProjectedAccumulator(model) as acc:
        # The first microbatch of a step is plain accumulation and needs no sequence data.
        with acc.microbatch(mbs[0]["seq_ids"]):
            fused_losses(model, mbs[0]).backward()
        before = {n: p.grad.clone() for n, p in model.named_parameters()}
        with pytest.raises(RuntimeError, match="not the sum of the per-sequence gradients"):
            with acc.microbatch(mbs[1]["seq_ids"]):
                fused_losses(model, mbs[1]).backward()
        assert all(torch.equal(p.grad, before[n]) for n, p in model.named_parameters())
        # a penalty on a covered weight is outside the layers' forward too
        with pytest.raises(RuntimeError, match="penalty term"):
            with acc.microbatch(mbs[1]["seq_ids"]):
                loss = toy_sequence_losses(model, mbs[1]).sum()
                (loss + model.proj.weight.square().sum()).backward()
        assert all(torch.equal(p.grad, before[n]) for n, p in model.named_parameters())
        with acc.microbatch(mbs[1]["seq_ids"]):  # the module path is fine
            toy_sequence_losses(model, mbs[1]).sum().backward()


def test_gradient_on_rows_no_sequence_touched_is_detected(gen):
    """An embedding's gradient outside the rows of the microbatch's ids is not per-sequence."""
    torch.manual_seed(0)
    model = ToyLM(vocab=40)
    mbs = row_microbatches(gen, 2, rows=4, length=5, vocab=20)  # ids 20..39 never occur
    with ProjectedAccumulator(model) as acc:
        with acc.microbatch(mbs[0]["seq_ids"]):
            toy_sequence_losses(model, mbs[0]).sum().backward()
        with pytest.raises(RuntimeError, match="penalty term"):
            with acc.microbatch(mbs[1]["seq_ids"]):
                loss = toy_sequence_losses(model, mbs[1]).sum()
                (loss + model.embed.weight[30:].square().sum()).backward()
        with acc.microbatch(mbs[1]["seq_ids"]):  # a zero penalty there is fine
            loss = toy_sequence_losses(model, mbs[1]).sum()
            (loss + 0 * model.embed.weight[30:].sum()).backward()


@pytest.mark.parametrize("rows", [slice(None), slice(20, None)], ids=["all-rows", "untouched"])
def test_penalty_on_a_tied_fused_head_is_detected(gen, monkeypatch, rows):
    """Tied embedding + fused head: the check subtracts the head's returned sum from autograd's
    gradient and compares the rest with the embedding's per-sequence parts, without reading the
    head's per-sequence gradients; a penalty on the tied weight (on every row, or only on rows
    no id of the microbatch touches) is still caught."""
    from proma_accum import _consistency

    torch.manual_seed(0)
    model = ToyLM(vocab=40, tied=True)
    mbs = row_microbatches(gen, 2, rows=4, length=5, vocab=20)  # ids 20..39 never occur
    passes = []
    real_add_block = _consistency.Consistency.add_block

    def spy(self, seq_block, grad_block):  # the sum check over per-sequence gradients
        passes.append(self.name)
        return real_add_block(self, seq_block, grad_block)

    monkeypatch.setattr(_consistency.Consistency, "add_block", spy)
    with ProjectedAccumulator(model) as acc:
        with acc.microbatch(mbs[0]["seq_ids"]):
            toy_sequence_losses(model, mbs[0]).sum().backward()
        before = {n: p.grad.clone() for n, p in model.named_parameters()}
        with pytest.raises(RuntimeError, match="penalty term"):
            with acc.microbatch(mbs[1]["seq_ids"]):
                loss = toy_sequence_losses(model, mbs[1]).sum()
                (loss + 1e-2 * model.head.weight[rows].square().sum()).backward()
        assert all(torch.equal(p.grad, before[n]) for n, p in model.named_parameters())
        passes.clear()
        with acc.microbatch(mbs[1]["seq_ids"]):  # without the penalty: fine
            toy_sequence_losses(model, mbs[1]).sum().backward()
    # the tied weight's pass over its per-sequence gradients did not do the sum check
    assert passes and "embed.weight" not in passes


def test_penalty_on_a_weight_with_two_fused_uses_is_detected(gen):
    """A Linear applied twice: both fused sums are subtracted from autograd's gradient, and a
    penalty on the weight is what is left."""
    from test_reference_equivalence import SharedLinearLM

    torch.manual_seed(0)
    model = SharedLinearLM()
    mbs = row_microbatches(gen, 2, rows=4, length=5, vocab=23)
    with ProjectedAccumulator(model) as acc:
        with acc.microbatch(mbs[0]["seq_ids"]):
            toy_sequence_losses(model, mbs[0]).sum().backward()
        before = {n: p.grad.clone() for n, p in model.named_parameters()}
        with pytest.raises(RuntimeError, match="penalty term"):
            with acc.microbatch(mbs[1]["seq_ids"]):
                loss = toy_sequence_losses(model, mbs[1]).sum()
                (loss + 1e-2 * model.proj.weight.square().sum()).backward()
        assert all(torch.equal(p.grad, before[n]) for n, p in model.named_parameters())
        with acc.microbatch(mbs[1]["seq_ids"]):  # without the penalty: fine
            toy_sequence_losses(model, mbs[1]).sum().backward()


def test_fused_head_error_untied(gen):
    torch.manual_seed(0)
    model = ToyLM(tied=False)
    mb = row_microbatches(gen, 1, rows=4, length=5, vocab=23)[0]

    def fused(mb):
        h = model.rms(model.ln(torch.tanh(model.proj(model.embed(mb["input_ids"])))))
        (h @ model.head.weight.T).sum().backward()

    with ProjectedAccumulator(model) as acc:
        with acc.microbatch(mb["seq_ids"]):
            fused(mb)
        before = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        with pytest.raises(RuntimeError, match="none of its layers"), acc.microbatch(mb["seq_ids"]):
            fused(mb)
        assert all(
            torch.equal(p.grad, before[n]) for n, p in model.named_parameters() if n in before
        )


def test_advantages_mode_requires_full_coverage(gen):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4))
    model.register_parameter("extra", nn.Parameter(torch.ones(4)))
    with pytest.warns(UserWarning, match="extra"), ProjectedAccumulator(model) as acc:
        with pytest.raises(ValueError, match="extra"):
            with acc.microbatch(torch.arange(2), advantages=torch.ones(2)):
                pass


def test_microbatch_of_padding_only(gen):
    """No sequences: nothing to project against; loss mode adds the gradient plainly."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 3))
    x = torch.randint(0, 10, (2, 3))
    with ProjectedAccumulator(model) as acc:
        with acc.microbatch(torch.tensor([0, 1])):
            model(x).sum().backward()
        before = {n: p.grad.clone() for n, p in model.named_parameters()}
        with acc.microbatch(torch.tensor([-1, -1])):
            model(x).sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, 2 * before[n])
    with ProjectedAccumulator(model) as acc:
        with acc.microbatch(torch.tensor([-1, -1]), advantages=torch.ones(1)):
            model(x).sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, 2 * before[n])  # no sequence: adds nothing
