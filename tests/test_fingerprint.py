"""Weights fingerprints: equal for equal tensors, different for any change of name, dtype, shape or value."""
import torch
from safetensors.torch import load_file, save_file

from timm_stitch.fingerprint import weights_fingerprint


def test_fingerprint_follows_the_tensors_not_the_file(tmp_path):
    state = {'b': torch.arange(6.0).reshape(2, 3), 'a': torch.ones(3, dtype=torch.float16)}
    reference = weights_fingerprint(state)
    assert len(reference) == 16 and weights_fingerprint(dict(reversed(list(state.items())))) == reference
    save_file(state, tmp_path / 'one.safetensors')
    save_file(dict(reversed(list(state.items()))), tmp_path / 'two.safetensors')
    assert weights_fingerprint(load_file(tmp_path / 'one.safetensors')) == reference
    assert weights_fingerprint(load_file(tmp_path / 'two.safetensors')) == reference
    changed = [
        {**state, 'b': state['b'] + 1e-3},                # a value
        {**state, 'b': state['b'].double()},              # a dtype
        {**state, 'b': state['b'].reshape(3, 2)},         # a shape
        {'c': state['b'], 'a': state['a']},               # a name
        {'b': state['b']},                                # a tensor fewer
    ]
    assert len({weights_fingerprint(s) for s in changed} | {reference}) == len(changed) + 1


def test_fingerprint_of_a_module_is_that_of_its_state_dict():
    layer = torch.nn.Linear(3, 2)
    assert weights_fingerprint(layer) == weights_fingerprint(layer.state_dict())
    with torch.no_grad():
        layer.bias.zero_()
    assert weights_fingerprint(layer) != weights_fingerprint(torch.nn.Linear(3, 2).state_dict())
