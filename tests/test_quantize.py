"""Quantized routes (issue 26): one int8 network serving every route, saved and loaded with its scheme, measured per
precision on route cards."""
from __future__ import annotations

import json

import pytest
import timm
import torch
from image_folders import ANCHORS, make_image_folder
from tiny_models import SMALL_ARCHS, tiny_images, tiny_snnet

import timm_stitch
from timm_stitch.card_readme import render_readme
from timm_stitch.cards import RouteCard
from timm_stitch.errors import StaleCardError
from timm_stitch.hub import CONFIG_NAME, save_pretrained
from timm_stitch.quantization import QuantizedLinear, quantize
from timm_stitch.serving import mixed_forward
from timm_stitch.stitching import LoRALinear
from timm_stitch.validate import main as validate_main

SCHEMES = ('int8-wo', 'int8-dyn')
ARCH = 'snnet_deit_tsb'


def _small(**kwargs) -> timm_stitch.StitchedNet:
    torch.manual_seed(0)
    return timm.create_model(ARCH, **SMALL_ARCHS[ARCH][0], **kwargs).eval()


@pytest.mark.parametrize('scheme', SCHEMES)
def test_quantized_routes_switch_like_their_exports(scheme):
    model = tiny_snnet()
    x = tiny_images(3)
    quantized = quantize(model, scheme)
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())  # a copy: the float model is kept
    assert all(isinstance(s.transform, QuantizedLinear) for st in quantized.stitch_layers.values() for p in st
               for s in p)
    assert [r.params for r in quantized.routes()] == [r.params for r in model.routes()]
    with torch.no_grad():
        for k in range(quantized.num_routes):
            out = quantized(x, stitch_id=k)
            assert torch.equal(out, quantized.export_stitch(k)(x)), f'route {k}'
            quantized.set_stitch(k)
            assert torch.equal(quantized(x), out)
            torch.testing.assert_close(out, model(x, stitch_id=k), atol=0.1, rtol=0.1)


@pytest.mark.parametrize('scheme', SCHEMES)
def test_per_sample_routes_work_quantized(scheme):
    quantized = quantize(tiny_snnet(), scheme)
    x = tiny_images(8)
    ids = torch.tensor([0, 5, 2, 5, 9, 0, 2, 9])
    with torch.no_grad():
        out = mixed_forward(quantized, x, ids, share_prefix=False)  # each route's samples run as one batch
        for k in ids.unique().tolist():
            pos = (ids == k).nonzero().flatten()
            assert torch.equal(out[pos], quantized(x[pos], stitch_id=k)), f'route {k}'
        shared = quantized(x, stitch_id=ids)
    # with shared prefixes, dynamic activation scales are those of the shared batch: close, not bit-equal
    torch.testing.assert_close(shared, out, atol=0.05, rtol=0.05)


def test_stitches_in_float_and_low_rank_stitches():
    model = tiny_snnet(stitch_lora_rank=2)
    float_stitches = quantize(model, 'int8-dyn', quantize_stitches=False)
    assert isinstance(float_stitches.stitch_layers['0'][0][0].transform, LoRALinear)
    assert isinstance(float_stitches.anchors[0].blocks[0].mlp.fc1, QuantizedLinear)
    merged = quantize(model, 'int8-dyn')  # low-rank layers are merged, then quantized
    assert isinstance(merged.stitch_layers['0'][0][0].transform, QuantizedLinear)
    x = tiny_images(2)
    with torch.no_grad():
        assert torch.equal(float_stitches(x, stitch_id=5), float_stitches.export_stitch(5)(x))


def test_scheme_errors():
    model = tiny_snnet()
    with pytest.raises(ValueError, match="unknown quantization scheme 'int3': valid schemes are int8-wo, int8-dyn"):
        quantize(model, 'int3')
    with pytest.raises(ValueError, match=r'already quantized \(int8-wo\)'):
        quantize(quantize(model, 'int8-wo'), 'int8-dyn')
    with pytest.raises(TypeError, match='quantize takes a stitched network'):
        quantize(torch.nn.Linear(2, 2), 'int8-wo')


@pytest.mark.parametrize('scheme', SCHEMES)
def test_save_and_load_round_trip_exactly(tmp_path, scheme):
    model = _small()
    quantized = quantize(model, scheme, quantize_stitches=scheme == 'int8-dyn')
    folder = save_pretrained(quantized, tmp_path / 'q')
    config = json.loads((folder / CONFIG_NAME).read_text())['model_args']
    assert config['quantize'] == scheme and config['quantize_stitches'] == (scheme == 'int8-dyn')
    loaded = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    assert loaded.quant_scheme == scheme
    expected, state = quantized.state_dict(), loaded.state_dict()
    assert state.keys() == expected.keys() and all(torch.equal(state[k], v) for k, v in expected.items())
    assert state['anchors.0.blocks.0.attn.qkv.weight'].dtype == torch.int8
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x, stitch_id=4), quantized(x, stitch_id=4))
    # a float checkpoint built with quantize= is quantized on load, as quantize() does
    float_folder = save_pretrained(model, tmp_path / 'float')
    built = timm.create_model(f'local-dir:{float_folder}', pretrained=True, quantize=scheme,
                              quantize_stitches=scheme == 'int8-dyn')
    assert all(torch.equal(built.state_dict()[k], v) for k, v in expected.items())


def _card(model, top1: float) -> RouteCard:
    return RouteCard.from_model(model).with_accuracy({k: (top1 + k / 10, None) for k in range(model.num_routes)},
                                                     'tiny', 'measured')


def test_cards_of_another_precision_are_stale_with_the_reason():
    model = tiny_snnet()
    quantized = quantize(model, 'int8-dyn')
    float_card, int8_card = _card(model, 50.0), _card(quantized, 40.0)
    assert int8_card.precision == 'int8-dyn' and float_card.precision == 'fp32'
    quantized.load_card(float_card)
    stale = quantized.route(0).extra['accuracy_stale']
    assert quantized.route(0).top1 is None
    assert "precision='fp32' (the model has 'int8-dyn')" in stale and 'validate --quantize int8-dyn' in stale
    with pytest.raises(StaleCardError, match="route card is stale, the card was measured with precision='fp32'"):
        quantized.select_stitch(min_top1=10)
    model.load_card(int8_card)
    assert "precision='int8-dyn' (the model has 'fp32')" in model.route(0).extra['accuracy_stale']
    model.half()  # a float card (recording its precision) does not hold for fp16 either
    model.load_card(float_card)
    assert "precision='fp32' (the model has 'fp16')" in model.route(0).extra['accuracy_stale']


def test_one_card_holds_a_front_per_precision(tmp_path):
    model = tiny_snnet()
    quantized = quantize(model, 'int8-dyn')
    profiled = timm_stitch.profile(quantize(model, 'int8-dyn'), warmup=0, repeats=1, progress=False)
    card = _card(model, 50.0).with_measurements(_card(quantized, 40.0)).with_measurements(profiled)
    card.save(tmp_path / 'routes.json')
    card = RouteCard.load(tmp_path / 'routes.json')
    assert card.held_precisions == ['fp32', 'int8-dyn'] and card.route(3).top1 == 50.3
    model.load_card(card)
    quantized.load_card(card)
    assert model.route(3).top1 == 50.3 and model.route(3).extra['precision'] == 'fp32'
    assert quantized.route(3).top1 == 40.3 and quantized.route(3).extra['precision'] == 'int8-dyn'
    assert quantized.latency_profile.endswith('-bs1-int8-dyn') and quantized.route(3).latency_ms is not None
    assert quantized.select_stitch(min_top1=40.5).top1 >= 40.5
    assert quantized.select_stitch(max_latency_ms=1e9).latency_ms is not None
    assert [r.id for r in quantized.pareto()] and all(r.top1 < 50 for r in quantized.pareto())
    readme = render_readme(card, plot_name=None)
    assert '| top-1 (fp32) | top-5 (fp32) | top-1 (int8-dyn) |' in readme
    assert '- int8-dyn: routes ' in readme and '- fp32: routes ' in readme
    pytest.importorskip('matplotlib')
    from timm_stitch.card_readme import plot_card
    plot_card(card, tmp_path / 'plot.png')
    assert (tmp_path / 'plot.png').stat().st_size > 0


def test_validate_measures_the_quantized_network(tmp_path):
    data = make_image_folder(tmp_path / 'data', per_class=(1, 3))
    out = tmp_path / 'out'
    args = ['--model', 'snnet', '--model-kwargs', f'anchors={ANCHORS!r}', '--num-classes', '4', '--img-size', '32',
            '--crop-pct', '1.0', '-b', '8', '-j', '0', '--no-progress', '--data-dir', str(data), '--routes', '0,3',
            '--out', str(out), '--quantize', 'int8-wo']
    assert validate_main(args) == 0
    card = RouteCard.load(out / 'routes.json')
    assert card.precision == 'int8-wo' and card.route(3).top1 is not None
    assert any(p.get('precision') == 'int8-wo' for p in card.provenance)
    record = json.loads((out / 'routes.jsonl').read_text().splitlines()[0])
    assert record['key']['settings']['quantize'] == 'int8-wo'
