"""rl.state_slots: a model's state dict read and set where each entry lives."""

from __future__ import annotations

import torch

from miniray.rl.models import char_tokenizer, tiny_qwen2
from miniray.rl.state_slots import StateSlots
from miniray.rl.tasks import ArithmeticTask


def tiny_model():
    torch.manual_seed(0)
    return tiny_qwen2(
        char_tokenizer(ArithmeticTask().alphabet), hidden_size=32, intermediate_size=64
    )


def test_read_is_the_state_dict_of_live_tensors_with_tied_entries_as_one():
    model = tiny_model()  # its output embedding is its input embedding
    slots = StateSlots(model)
    assert slots.direct and slots.tied == {"lm_head.weight": "model.embed_tokens.weight"}
    state, expected = slots.read(), model.state_dict()
    assert list(state) == list(expected)  # same names, same order; no non-persistent buffers
    assert all(torch.equal(state[k], v) and not state[k].requires_grad for k, v in expected.items())
    assert state["lm_head.weight"] is state["model.embed_tokens.weight"]
    with torch.no_grad():  # live: the parameters themselves, not copies
        model.get_parameter("model.norm.weight")[0] = 7.0
    assert state["model.norm.weight"][0] == 7.0
    # A parameter replaced by another object is read where it lives now.
    norm = model.get_submodule("model.norm")
    norm.weight = torch.nn.Parameter(torch.full_like(norm.weight, 3.0))
    assert torch.equal(slots.read()["model.norm.weight"], norm.weight.detach())


def test_a_model_with_a_state_dict_hook_is_read_through_state_dict():
    model = tiny_model()

    def scale(module, state, prefix, local_metadata):
        state[prefix + "weight"] = state[prefix + "weight"] * 2

    model.get_submodule("model.norm")._register_state_dict_hook(scale)
    slots = StateSlots(model)
    assert not slots.direct
    read = slots.read()
    assert torch.equal(read["model.norm.weight"], model.get_parameter("model.norm.weight") * 2)


def test_assign_makes_the_tensors_the_parameters_and_keeps_requires_grad():
    model = tiny_model()
    model.get_parameter("model.norm.weight").requires_grad_(False)
    slots = StateSlots(model)
    new = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    new["lm_head.weight"] = new["model.embed_tokens.weight"]  # tied: one tensor, as published
    assert all(slots.takes(k, v) for k, v in new.items())
    assert not slots.takes("model.norm.weight", new["model.norm.weight"].double())
    slots.assign(new)
    for name, tensor in new.items():
        param = model.get_parameter(name)
        assert param.data_ptr() == tensor.data_ptr()  # taken as it is, no copy
    assert not model.get_parameter("model.norm.weight").requires_grad
    assert model.get_parameter("model.embed_tokens.weight").requires_grad


def test_assign_keeps_tied_entries_tied_whether_or_not_they_are_given():
    model = tiny_model()
    slots = StateSlots(model)
    for with_tied in (True, False):
        new = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
        new["lm_head.weight"] = new["model.embed_tokens.weight"]
        if not with_tied:
            del new["lm_head.weight"]
        slots.assign(new)
        assert model.lm_head.weight is model.model.embed_tokens.weight
        assert model.lm_head.weight.data_ptr() == new["model.embed_tokens.weight"].data_ptr()
