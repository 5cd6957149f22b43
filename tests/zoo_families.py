"""The timm zoo as families of anchors, and a tiny configuration of each (the one table of tiny kwargs).

A *family* is a timm model module (``timm.models.<module>``) with at least two pretrained sizes of one model class at
one input size; its anchor pair is the two smallest of them by parameter count (:func:`zoo_families`, from timm's
registry). :data:`TINY` gives, per family, the same two anchors built small through timm's own model kwargs (depth,
widths, image size) and the input size they take: ``tests/test_zoo.py`` runs each through the stitching contract in
the quick suite and ``benchmarks/zoo_coverage.py`` uses them for its forward checks.
"""
from __future__ import annotations

import functools
import warnings
from concurrent.futures import ProcessPoolExecutor
from typing import Any, NamedTuple, Optional

import timm
import torch

import timm_stitch
from timm_stitch import StitchedNet

#: cross-family anchor pairs (front, end) the benchmark and the registry test stitch, at 224 px
CROSS_PAIRS: tuple[tuple[str, str], ...] = (
    ('resnet50', 'vit_small_patch16_224'),
    ('resnet18', 'swin_tiny_patch4_window7_224'),
    ('convnext_tiny', 'swin_tiny_patch4_window7_224'),
    ('efficientnet_b0', 'convnext_tiny'),
    ('vit_small_patch14_dinov2', 'vit_large_patch14_clip_224'),
    ('vit_base_patch16_clip_224', 'vit_large_patch14_clip_224'),
    ('deit_small_patch16_224', 'eva02_small_patch14_224'),
    ('resnet50', 'convnext_tiny'),
    ('regnety_016', 'resnet50'),
    ('mobilenetv3_large_100', 'efficientnet_b0'),
    ('convnext_tiny', 'vit_base_patch16_224'),
    ('resnet50', 'deit_base_patch16_224'),
    ('efficientnet_b0', 'swin_tiny_patch4_window7_224'),
    ('deit_tiny_patch16_224', 'swin_tiny_patch4_window7_224'),
)


class TinyZoo(NamedTuple):
    """Two anchors of a family built small: their timm names, the kwargs of each and the input size they take."""
    anchors: tuple[str, str]
    kwargs: tuple[dict[str, Any], dict[str, Any]]
    img: int
    #: kwargs of both anchors at their real size too (a timm option stitching needs, e.g. a fixed image size)
    real: dict[str, Any] = {}

    def real_specs(self) -> list[dict[str, Any]]:
        """The anchors at their real size as ``timm_stitch.stitch`` kwargs dicts."""
        return [dict(model_name=name, **self.real) for name in self.anchors]

    def specs(self) -> list[dict[str, Any]]:
        """The anchors as ``timm_stitch.stitch`` kwargs dicts; their pretrained cfg states the input size they are
        built for (the size adapters probe and fixed-size models require)."""
        overlay = dict(pretrained_cfg_overlay=dict(input_size=(3, self.img, self.img)))
        return [dict(model_name=name, **overlay, **self.real, **kw) for name, kw in zip(self.anchors, self.kwargs)]

    def build(self, seed: int = 0) -> StitchedNet:
        """The two tiny anchors stitched, with 10 classes (anchors may otherwise keep different class counts)."""
        torch.manual_seed(seed)
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            return timm_stitch.stitch(self.specs(), num_classes=10)

    def images(self, n: int = 2, seed: int = 0) -> torch.Tensor:
        return torch.randn(n, 3, self.img, self.img, generator=torch.Generator().manual_seed(seed))


def _tiny(a: str, b: str, img: int, shared: Optional[dict] = None, ka: Optional[dict] = None,
          kb: Optional[dict] = None) -> TinyZoo:
    return TinyZoo((a, b), ({**(shared or {}), **(ka or {})}, {**(shared or {}), **(kb or {})}), img)


_VIT = dict(img_size=32, patch_size=8, num_heads=2)
_ONE, _TWO = dict(depth=2, embed_dim=16), dict(depth=3, embed_dim=32)
_L4A, _L4B = (1, 1, 1, 1), (1, 1, 2, 1)
_DIMS4 = (8, 16, 32, 64)
_HEADS4 = (1, 2, 4, 8)

#: family (timm module) -> its two smallest anchors built small; families missing here run at their real size
TINY: dict[str, TinyZoo] = {
    'beit': _tiny('beit_base_patch16_224', 'beit_large_patch16_224', 32, _VIT, _ONE, _TWO),
    'byoanet': _tiny('eca_botnext26ts_256', 'eca_halonext26ts', 256),
    'byobnet': _tiny('mobileone_s1', 'mobileone_s0', 32),
    'cait': _tiny('cait_xxs24_224', 'cait_xxs36_224', 32, _VIT, _ONE, _TWO),
    'coat': _tiny('coat_tiny', 'coat_lite_tiny', 64, dict(img_size=64)),
    'convit': _tiny('convit_tiny', 'convit_small', 32, dict(_VIT, local_up_to_layer=1), _ONE, _TWO),
    'convmixer': _tiny('convmixer_768_32', 'convmixer_1024_20_ks9_p14', 28),
    'convnext': _tiny('convnext_zepto_rms', 'convnext_zepto_rms_ols', 32, dict(dims=_DIMS4),
                      dict(depths=_L4A), dict(depths=_L4B)),
    'cpubone': _tiny('cpubone_nano', 'cpubone_t0', 64),
    'crossvit': _tiny('crossvit_tiny_240', 'crossvit_9_240', 240),
    'cspnet': _tiny('cs3darknet_focus_s', 'cs3darknet_focus_m', 64),
    'cspnext': _tiny('cspnext_tiny', 'cspnext_s', 64),
    'davit': _tiny('davit_tiny', 'davit_small', 64, dict(embed_dims=(16, 32, 64, 128), num_heads=_HEADS4,
                                                           window_size=2), dict(depths=_L4A), dict(depths=_L4B)),
    'deepseek_vit': _tiny('deepseek_vit_412m', 'deepseek_vit_412m_align', 32, _VIT, _ONE, _TWO),
    'deit': _tiny('deit_tiny_patch16_224', 'deit_small_patch16_224', 32, _VIT, _ONE, _TWO),
    'densenet': _tiny('densenet121', 'densenetblur121d', 32, dict(growth_rate=8),
                      dict(block_config=_L4A), dict(block_config=_L4B)),
    'dla': _tiny('dla46x_c', 'dla46_c', 64),
    'dpn': _tiny('dpn68', 'dpn92', 64),
    'edgenext': _tiny('edgenext_xx_small', 'edgenext_x_small', 64),
    'efficientformer': _tiny('efficientformer_l1', 'efficientformer_l3', 224,
                             dict(embed_dims=(16, 32, 48, 64), num_vit=1), dict(depths=_L4A), dict(depths=_L4B)),
    'efficientformer_v2': _tiny('efficientformerv2_s0', 'efficientformerv2_s1', 64, dict(img_size=64)),
    'efficientnet': _tiny('mobilenetv2_050', 'mnasnet_small', 64),
    'efficientvim': _tiny('efficientvim_m1', 'efficientvim_m2', 64),
    'efficientvit_mit': _tiny('efficientvit_b0', 'efficientvit_b1', 64),
    'efficientvit_msra': _tiny('efficientvit_m0', 'efficientvit_m1', 64, dict(img_size=64)),
    # DINOv3 is registered with dynamic_img_size=True (its rotary table then follows each batch): built at one size
    'eva': _tiny('vit_tiny_patch16_dinov3_qkvb', 'vit_small_patch16_dinov3', 32, _VIT, _ONE, _TWO)._replace(
        real=dict(dynamic_img_size=False)),
    'fasternet': _tiny('fasternet_t0', 'fasternet_t1', 64, dict(embed_dim=16), dict(depths=_L4A),
                       dict(depths=_L4B)),
    'fastvit': _tiny('fastvit_t8', 'fastvit_t12', 64, dict(embed_dims=_DIMS4), dict(layers=_L4A),
                     dict(layers=_L4B)),
    'focalnet': _tiny('focalnet_tiny_srf', 'focalnet_tiny_lrf', 64),
    'gcvit': _tiny('gcvit_xxtiny', 'gcvit_xtiny', 64, dict(img_size=64)),
    'gemma4_vit': _tiny('gemma4_vit_167m', 'gemma4_vit_570m', 32, dict(_VIT, head_dim=8),
                        dict(_ONE, intermediate_size=32), dict(_TWO, intermediate_size=64)),
    'ghostnet': _tiny('ghostnet_100', 'ghostnetv2_100', 64),
    'hardcorenas': _tiny('hardcorenas_b', 'hardcorenas_a', 64),
    'hgnet': _tiny('hgnetv2_b0', 'hgnetv2_b1', 64),
    'hiera': _tiny('hiera_tiny_224', 'hiera_small_224', 64, dict(img_size=64, embed_dim=16, num_heads=1),
                   dict(stages=_L4A), dict(stages=_L4B)),
    'hieradet_sam2': _tiny('sam2_hiera_tiny', 'sam2_hiera_small', 128),
    'hrnet': _tiny('hrnet_w18_small', 'hrnet_w18_small_v2', 64),
    'iformer': _tiny('iformer_t', 'iformer_s', 64),
    'inception_next': _tiny('inception_next_atto', 'inception_next_tiny', 32, dict(dims=_DIMS4),
                            dict(depths=_L4A), dict(depths=_L4B)),
    'lcnetv2': _tiny('lcnetv2_small', 'lcnetv2_base', 64),
    'levit': _tiny('levit_128s', 'levit_128', 64, dict(img_size=64, embed_dim=(16, 24, 32), key_dim=8,
                                                       num_heads=(2, 3, 4)),
                   dict(depth=(2, 2, 2)), dict(depth=(2, 3, 2))),
    'lowformer': _tiny('lowformer_b0', 'lowformer_b1', 64),
    'mambaout': _tiny('mambaout_femto', 'mambaout_kobe', 32, dict(dims=_DIMS4), dict(depths=_L4A),
                      dict(depths=_L4B)),
    'maxxvit': _tiny('maxvit_rmlp_pico_rw_256', 'maxvit_nano_rw_256', 64, dict(img_size=64)),
    'metaformer': _tiny('poolformerv2_s12', 'poolformer_s12', 32),
    'mlp_mixer': _tiny('resmlp_12_224', 'gmlp_s16_224', 32, dict(img_size=32)),
    'mobilenetv3': _tiny('mobilenetv3_small_050', 'lcnet_050', 64),
    'mobilevit': _tiny('mobilevit_xxs', 'mobilevitv2_050', 64),
    'mvitv2': _tiny('mvitv2_tiny', 'mvitv2_small', 64, dict(img_size=64)),
    'naflexvit': _tiny('naflexvit_base_patch16_parfac_gap', 'naflexvit_base_patch16_gap', 64,
                       dict(img_size=64, embed_dim=32, num_heads=2, depth=3)),
    'nest': _tiny('nest_tiny_jx', 'nest_small_jx', 32, dict(img_size=32)),
    'nextvit': _tiny('nextvit_small', 'nextvit_base', 64),
    'nfnet': _tiny('nf_regnet_b1', 'nf_resnet50', 64),
    'pit': _tiny('pit_ti_224', 'pit_ti_distilled_224', 64, dict(img_size=64)),
    'pvt_v2': _tiny('pvt_v2_b0', 'pvt_v2_b1', 64, dict(embed_dims=(16, 32, 64, 128), num_heads=_HEADS4),
                    dict(depths=_L4A), dict(depths=_L4B)),
    'qwen3_vit': _tiny('qwen3_vit_88m', 'qwen3_vit_88m_merge', 32, _VIT, _ONE, _TWO),
    'rdnet': _tiny('rdnet_tiny', 'rdnet_small', 64),
    'regnet': _tiny('regnetx_002', 'regnety_002', 64),
    'repghost': _tiny('repghostnet_050', 'repghostnet_058', 64),
    'repvit': _tiny('repvit_m1', 'repvit_m0_9', 64, dict(embed_dim=(16, 32, 64, 128)), dict(depth=_L4A),
                    dict(depth=_L4B)),
    'res2net': _tiny('res2next50', 'res2net50_14w_8s', 32, None, dict(layers=_L4A), dict(layers=_L4B)),
    'resnest': _tiny('resnest14d', 'resnest26d', 32, None, dict(layers=_L4A), dict(layers=_L4B)),
    'resnet': _tiny('resnet10t', 'resnet14t', 32, dict(channels=_DIMS4, layers=(2, 2, 2, 2))),
    'resnetv2': _tiny('resnetv2_18', 'resnetv2_18d', 32, dict(channels=(8, 16, 32, 64), stem_chs=8),
                      dict(layers=_L4A), dict(layers=_L4B)),
    'rexnet': _tiny('rexnet_100', 'rexnet_130', 64),
    'selecsls': _tiny('selecsls60', 'selecsls42b', 64),
    'senet': _tiny('legacy_seresnet18', 'legacy_seresnext26_32x4d', 32, dict(layers=_L4A)),
    'sequencer': _tiny('sequencer2d_s', 'sequencer2d_m', 32),
    'shvit': _tiny('shvit_s1', 'shvit_s2', 64),
    'sknet': _tiny('skresnet18', 'skresnet34', 32, None, dict(layers=_L4A), dict(layers=_L4B)),
    'starnet': _tiny('starnet_s1', 'starnet_s2', 32, dict(base_dim=8), dict(depths=_L4A), dict(depths=_L4B)),
    'swiftformer': _tiny('swiftformer_xs', 'swiftformer_s', 64, dict(embed_dims=(16, 32, 48, 64)),
                         dict(layers=_L4A), dict(layers=_L4B)),
    'swin_transformer': _tiny('swin_tiny_patch4_window7_224', 'swin_s3_tiny_224', 32,
                              dict(img_size=32, patch_size=2, window_size=2, embed_dim=16, num_heads=_HEADS4),
                              dict(depths=_L4A), dict(depths=_L4B)),
    'swin_transformer_v2': _tiny('swinv2_tiny_window16_256', 'swinv2_small_window16_256', 32,
                                 dict(img_size=32, patch_size=2, window_size=2, embed_dim=16, num_heads=_HEADS4),
                                 dict(depths=_L4A), dict(depths=_L4B)),
    'swin_transformer_v2_cr': _tiny('swinv2_cr_tiny_ns_224', 'swinv2_cr_small_224', 32,
                                    dict(img_size=32, patch_size=2, window_size=2, embed_dim=16,
                                         num_heads=_HEADS4), dict(depths=_L4A), dict(depths=_L4B)),
    'tiny_vit': _tiny('tiny_vit_5m_224', 'tiny_vit_11m_224', 64, dict(embed_dims=(16, 32, 64, 128),
                                                                       num_heads=_HEADS4, window_sizes=(2, 2, 2, 2)),
                      dict(depths=_L4A), dict(depths=_L4B)),
    'tnt': _tiny('tnt_s_legacy_patch16_224', 'tnt_s_patch16_224', 32,
                 dict(img_size=32, patch_size=8, inner_dim=8, num_heads_outer=2, num_heads_inner=1), _ONE, _TWO),
    'tresnet': _tiny('tresnet_m', 'tresnet_v2_l', 64),
    'twins': _tiny('twins_svt_small', 'twins_pcpvt_small', 64),
    'vgg': _tiny('vgg11', 'vgg11_bn', 64, dict(mlp_ratio=0.01)),
    'visformer': _tiny('visformer_tiny', 'visformer_small', 64, dict(img_size=64)),
    'vision_transformer': _tiny('vit_tiny_patch16_224', 'vit_xsmall_patch16_clip_224', 32, _VIT, _ONE, _TWO),
    'vision_transformer_hybrid': _tiny('vit_tiny_r_s16_p8_224', 'vit_small_r26_s32_224', 64, dict(img_size=64),
                                       dict(depth=2), dict(depth=3)),
    'vision_transformer_relpos': _tiny('vit_srelpos_small_patch16_224', 'vit_relpos_small_patch16_224', 32, _VIT,
                                       _ONE, _TWO),
    'vision_transformer_sam': _tiny('samvit_base_patch16', 'samvit_large_patch16', 64,
                                    dict(img_size=64, num_heads=2, window_size=2, global_attn_indexes=(1,)),
                                    _ONE, _TWO),
    'vitamin': _tiny('vitamin_small_224', 'vitamin_base_224', 64, dict(img_size=64), dict(depth=2),
                     dict(depth=3)),
    'volo': _tiny('volo_d1_224', 'volo_d2_224', 64, dict(img_size=64)),
    'vovnet': _tiny('ese_vovnet19b_dw', 'ese_vovnet39b', 64),
    'xception_aligned': _tiny('xception41p', 'xception41', 64),
    'xcit': _tiny('xcit_nano_12_p8_224', 'xcit_nano_12_p16_224', 32, dict(img_size=32), dict(depth=2),
                  dict(depth=3)),
}


def check_net(model: StitchedNet, images: torch.Tensor) -> tuple[bool, bool]:
    """(anchor routes equal their timm anchors bit for bit in eval mode, every route runs forward and backward in
    one mixed-route batch with a gradient reaching every stitching layer it uses)."""
    model.eval()
    with torch.no_grad():
        exact = all(torch.equal(model(images, stitch_id=a), anchor(images)) for a, anchor in enumerate(model.anchors))
    with torch.no_grad():  # a zero-initialised linear layer (MLP-Mixer's, Hiera's classifier) passes no gradient
        for layer in model.anchors.modules():
            if isinstance(layer, torch.nn.Linear) and not layer.weight.any():
                layer.weight.normal_(std=0.02)
    ids = [r.id for r in model.plan.routes]
    x = images[:1].expand(len(ids), *images.shape[1:]).contiguous()
    model.zero_grad(set_to_none=True)
    out = model(x, stitch_id=ids)
    out = out[0] if isinstance(out, tuple) else out
    ok = out.shape[0] == len(ids) and bool(torch.isfinite(out).all())
    out.square().mean().backward()
    for route in model.plan.routes:
        for ref in route.stitches:
            grad = model.stitch_layer(ref).transform.weight.grad
            ok = ok and grad is not None and bool(grad.abs().sum() > 0)
    return exact, ok


class ArchInfo(NamedTuple):
    """What timm's registry and a ``device='meta'`` build say about one pretrained architecture."""
    name: str
    module: str
    cls: str
    params: int
    img: int


def arch_info(name: str) -> Optional[ArchInfo]:
    """``name``'s module, model class, parameter count and default pretrained input size (None if it fails to
    build on the meta device)."""
    from timm.models._registry import _model_to_module, get_arch_name
    cfg = timm.models.get_pretrained_cfg(name)
    try:
        with torch.device('meta'), warnings.catch_warnings():
            warnings.simplefilter('ignore')
            model = timm.create_model(name)
    except Exception:  # noqa: BLE001 - an architecture that does not build is no anchor
        return None
    return ArchInfo(name, _model_to_module[get_arch_name(name)], type(model).__name__,
                    sum(p.numel() for p in model.parameters()), cfg.input_size[-1])


@functools.cache
def zoo_families(workers: int = 1) -> dict[str, tuple[str, str]]:
    """Every timm model module with at least two pretrained sizes (parameter counts) of one model class at one
    input size, mapped to its two smallest such anchors (the group whose two smallest are smallest; timm's
    ``test_*`` models left out). Builds every pretrained architecture on the meta device (minutes)."""
    names = sorted({n.split('.')[0] for n in timm.list_models(pretrained=True)} - set(timm.list_models('test_*')))
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            infos = list(pool.map(arch_info, names, chunksize=8))
    else:
        infos = [arch_info(n) for n in names]
    groups: dict[tuple[str, str, int], list[tuple[int, str]]] = {}
    for info in filter(None, infos):
        groups.setdefault((info.module, info.cls, info.img), []).append((info.params, info.name))
    best: dict[str, tuple[int, str, str]] = {}
    for (module, _, _), members in groups.items():
        members.sort()
        larger = [m for m in members if m[0] > members[0][0]]
        if larger and (module not in best or members[0][0] + larger[0][0] < best[module][0]):
            best[module] = (members[0][0] + larger[0][0], members[0][1], larger[0][1])
    return {module: (a, b) for module, (_, a, b) in sorted(best.items())}
