"""The optimizers: aelab's Adam(W) cuts tensors into pieces for torch's fused kernel, and that must be
exactly torch's fused Adam(W), state and all."""
import copy

import pytest
import torch
from hypothesis import given, strategies as st

from aelab.optim import CHUNK, TENSORS_PER_LAUNCH, SplitFusedAdam, piece_size, split, steps_together, together


def seed_mlp(seed=0):
    torch.manual_seed(seed)
    sizes = [784, 256, 128, 32, 128, 256, 784]
    return torch.nn.Sequential(*[torch.nn.Linear(a, b) for a, b in zip(sizes, sizes[1:])])


def train(model, optimizer, steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.rand(16, 784, generator=gen)
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(torch.sigmoid(model(x)), x).backward()
        optimizer.step()


@pytest.mark.parametrize("decoupled,weight_decay", [(False, 0.0), (False, 1e-2), (True, 1e-2)])
def test_same_parameters_and_state_as_torch_fused_adam(decoupled, weight_decay):
    ours, theirs = seed_mlp(), seed_mlp()
    kw = dict(lr=1e-3, betas=(0.8, 0.99), weight_decay=weight_decay, decoupled_weight_decay=decoupled)
    mine = SplitFusedAdam(ours.parameters(), cut=True, **kw)  # cut on the CPU too (by default CUDA only)
    train(ours, mine, 7)
    reference = torch.optim.Adam(theirs.parameters(), fused=True, **kw)
    train(theirs, reference, 7)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(a, b)  # the same kernel on the same elements: bit for bit
    for sa, sb in zip(mine.state_dict()["state"].values(), reference.state_dict()["state"].values()):
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
        assert sa["step"].item() == 7


def test_adams_stepped_together_step_as_each_alone():
    """A stacked sweep's optimizers in one kernel call per setting (here: two rates, one of them a
    schedule's lr_device, and AdamW's decoupled decay): every parameter and state bit for bit its own."""
    settings = [dict(lr=1e-3), dict(lr=1e-3), dict(lr=3e-3), dict(lr=1e-3, decoupled_weight_decay=True, weight_decay=0.1)]
    models = [(seed_mlp(i), seed_mlp(i)) for i in range(len(settings))]
    alone = [SplitFusedAdam(a.parameters(), **kw) for (a, _), kw in zip(models, settings)]
    joint = [SplitFusedAdam(b.parameters(), **kw) for (_, b), kw in zip(models, settings)]
    joint[2].param_groups[0]["lr_device"] = torch.tensor(3e-3, dtype=torch.float64)  # as schedules.start sets it
    assert together(joint) and not together([torch.optim.SGD(seed_mlp().parameters(), lr=0.1)])
    tensors = [optimizer.tensors() for optimizer in joint]
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        x = torch.rand(16, 784, generator=gen)
        grads = []
        for (a, b), optimizer in zip(models, alone):
            optimizer.zero_grad(set_to_none=True)
            torch.nn.functional.mse_loss(torch.sigmoid(a(x)), x).backward()
            optimizer.step()
            grads.append(torch.autograd.grad(torch.nn.functional.mse_loss(torch.sigmoid(b(x)), x), list(b.parameters())))
        steps_together(joint, tensors, grads)
    for (a, b), one, other in zip(models, alone, joint):
        assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
        for sa, sb in zip(one.state_dict()["state"].values(), other.state_dict()["state"].values()):
            assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_the_seed_mlp_is_cut_and_fills_one_launch():
    model = seed_mlp()
    params = list(model.parameters())
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer = SplitFusedAdam(params)
    optimizer.step()
    state = [optimizer.state[p] for p in params]
    lists = split(params, [p.grad for p in params], [s["exp_avg"] for s in state],
                  [s["exp_avg_sq"] for s in state], [s["step"] for s in state], cut=True)
    assert len({len(column) for column in lists}) == 1
    assert len(params) < len(lists[0]) <= TENSORS_PER_LAUNCH  # 12 tensors → up to 36 pieces
    assert sum(t.numel() for t in lists[0]) == sum(p.numel() for p in params)
    weight = params[0]  # a piece is a view: the kernel's writes land in the parameter itself
    assert lists[0][0].untyped_storage().data_ptr() == weight.untyped_storage().data_ptr()
    with torch.no_grad():
        lists[0][0].zero_()
    assert weight.view(-1)[: lists[0][0].numel()].abs().sum() == 0


def test_tensors_are_cut_on_cuda_only_by_default(monkeypatch):
    """On the CPU the fused kernel parallelizes inside each tensor; pieces would only cost it."""
    import aelab.optim
    seen = []
    monkeypatch.setattr(aelab.optim, "split", lambda *lists, cut: seen.append(cut) or split(*lists, cut=cut))
    for cut, expected in ((None, False), (True, True), (False, False)):
        model = seed_mlp()
        train(model, SplitFusedAdam(model.parameters(), cut=cut), 1)
        assert seen.pop() is expected
    lists = split(*[[torch.zeros(200_000)]] * 4, [torch.zeros(())], cut=False)
    assert [len(column) for column in lists] == [1] * 5


def test_checkpoints_move_between_torch_adam_and_aelab_adam():
    """A torch Adam state_dict (older aelab checkpoints) resumes in aelab's Adam, and back."""
    ours, theirs = seed_mlp(), seed_mlp()
    reference = torch.optim.Adam(theirs.parameters(), fused=True)
    train(theirs, reference, 3)
    ours.load_state_dict(theirs.state_dict())
    mine = SplitFusedAdam(ours.parameters(), cut=True)
    mine.load_state_dict(copy.deepcopy(reference.state_dict()))  # as from a checkpoint file
    train(ours, mine, 4, seed=2)
    train(theirs, reference, 4, seed=2)
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), theirs.parameters()))
    back = torch.optim.Adam(seed_mlp().parameters(), fused=True)
    back.load_state_dict(copy.deepcopy(mine.state_dict()))
    assert back.state_dict()["state"][0]["step"].item() == 7


def test_adamw_stays_adamw_when_a_saved_group_lacks_the_flag():
    model = seed_mlp()
    adamw = SplitFusedAdam(model.parameters(), weight_decay=1e-2, decoupled_weight_decay=True)
    train(model, adamw, 1)
    saved = copy.deepcopy(adamw.state_dict())
    del saved["param_groups"][0]["decoupled_weight_decay"]  # as older torch versions saved AdamW
    adamw.load_state_dict(saved)
    assert adamw.param_groups[0]["decoupled_weight_decay"] is True


def test_parameters_without_gradients_are_left_alone():
    model = seed_mlp()
    frozen = model[0].weight.detach().clone()
    model[0].weight.requires_grad_(False)
    train(model, SplitFusedAdam([p for p in model.parameters()]), 2)
    assert torch.equal(model[0].weight, frozen)


@given(st.lists(st.integers(1, 3_000_000), min_size=1, max_size=40))
def test_pieces_fill_at_most_one_launch(numels):
    size = piece_size(numels)
    if size is None:  # nothing to gain: the tensors fill the slots, or pieces would be whole chunks
        assert len(numels) >= TENSORS_PER_LAUNCH or -(-sum(numels) // (TENSORS_PER_LAUNCH - len(numels))) > CHUNK - 2048
        return
    assert size % 2048 == 0 and size < CHUNK
    assert sum(-(-n // size) if n > size else 1 for n in numels) <= TENSORS_PER_LAUNCH
