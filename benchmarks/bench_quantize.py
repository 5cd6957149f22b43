"""Quantized routes: per-route CPU latency of the int8 network against float32 at batch 1 and 8, measured side by
side (round-robin) in one run, and the memory of the quantized stitched network against float32.

The network is a full-size DeiT-Ti/S/B family (``snnet_deit_tsb`` structure, random weights: latency and memory do
not depend on the values). Target: int8 / fp32 <= 0.6 on the largest routes. ``--compare`` also times the largest
route exported and quantized by the other candidates (torchao's int8 configs when installed, onnxruntime's dynamic
quantizer on the route's ONNX export), on one route, to show why timm-stitch uses PyTorch's own dynamic kernels.

    .venv/bin/python benchmarks/bench_quantize.py                 # about 5 minutes on 2 shared cores
    .venv/bin/python benchmarks/bench_quantize.py --compare       # plus the backend comparison
    .venv/bin/python benchmarks/bench_quantize.py --kernels       # only the kernels, on one DeiT-B layer
"""
from __future__ import annotations

import argparse
import copy
import os
import tempfile
from functools import partial

import timm
import torch
from _timing import interleaved, ratio_line, setup_torch

import timm_stitch

SCHEMES = ('int8-dyn', 'int8-wo')


def state_bytes(module: torch.nn.Module) -> int:
    """Bytes of every tensor in the state dict (weights, scales, buffers): what the network holds in memory."""
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def default_routes(model: timm_stitch.StitchedNet, count: int) -> list[int]:
    """The ``count - 2`` largest routes by MACs, the median one and the smallest."""
    routes = sorted(model.counted_routes(), key=lambda r: r.macs)
    picked = [r.id for r in routes[-(count - 2):]] + [routes[len(routes) // 2].id, routes[0].id]
    return list(dict.fromkeys(reversed(picked)))


def compare_backends(model: timm_stitch.StitchedNet, stitch_id: int, batch_sizes: list[int], repeats: int) -> None:
    """One route exported, quantized by each candidate, timed side by side against its float32 export."""
    exported = model.export_stitch(stitch_id)
    candidates = {'fp32': exported,
                  'timm-stitch int8-dyn': timm_stitch.quantize(model, 'int8-dyn').export_stitch(stitch_id),
                  'timm-stitch int8-wo': timm_stitch.quantize(model, 'int8-wo').export_stitch(stitch_id)}
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_
        for name, config in (('torchao int8-dyn', Int8DynamicActivationInt8WeightConfig()),
                             ('torchao int8-wo', Int8WeightOnlyConfig())):
            candidates[name] = copy.deepcopy(exported)
            quantize_(candidates[name], config)
    except ImportError:
        print('torchao is not installed (pip install "timm-stitch[quant]"): skipping its configs')
    size = model.pretrained_cfg['input_size']
    with tempfile.TemporaryDirectory() as tmp:
        try:
            import onnxruntime as ort
            from onnxruntime.quantization import QuantType, quantize_dynamic
            path, qpath = os.path.join(tmp, 'route.onnx'), os.path.join(tmp, 'route.int8.onnx')
            torch.onnx.export(exported, (torch.randn(1, *size),), path, dynamo=True, external_data=False,
                              dynamic_shapes=({0: torch.export.Dim('batch')},))
            quantize_dynamic(path, qpath, weight_type=QuantType.QInt8)
            options = ort.SessionOptions()
            options.intra_op_num_threads = torch.get_num_threads()
            for name, file in (('onnxruntime fp32', path), ('onnxruntime int8 dynamic', qpath)):
                session = ort.InferenceSession(file, options, providers=['CPUExecutionProvider'])
                input_name = session.get_inputs()[0].name
                candidates[name] = partial(lambda s, n, x: s.run(None, {n: x.numpy()}), session, input_name)
                print(f'{name}: model file {os.path.getsize(file) / 2**20:.1f} MiB')
        except ImportError:
            print('onnx/onnxruntime are not installed (pip install "timm-stitch[onnx]"): skipping them')
        for name in ('fp32', 'timm-stitch int8-dyn', 'timm-stitch int8-wo'):
            print(f'{name}: state {state_bytes(candidates[name]) / 2**20:.1f} MiB')
        for bs in batch_sizes:
            x = torch.randn(bs, *size)
            with torch.inference_mode():
                stats = interleaved({n: partial(m, x) for n, m in candidates.items()}, repeats, warmup=1)
            for name, s in stats.items():
                print(ratio_line(f'bs{bs} route {stitch_id} {name} / fp32', s, stats['fp32'], 0.6))


def compare_kernels(repeats: int) -> None:
    """One DeiT-B MLP layer (768 -> 3072) at batch 1 and 8 (197 and 1576 token rows): float32 against each int8
    candidate, and PyTorch's int4 weight-only CPU kernel (bf16 activations, the only fast path it has)."""
    from timm_stitch.quantization import QuantizedLinear
    linear = torch.nn.Linear(768, 3072).eval()
    layers = {'fp32': linear, **{f'timm-stitch {s}': QuantizedLinear.from_float(linear, s) for s in SCHEMES}}
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_
        for name, config in (('torchao int8-dyn', Int8DynamicActivationInt8WeightConfig()),
                             ('torchao int8-wo', Int8WeightOnlyConfig())):
            layers[name] = torch.nn.Sequential(copy.deepcopy(linear))
            quantize_(layers[name], config)
    except ImportError:
        print('torchao is not installed (pip install "timm-stitch[quant]"): skipping its configs')
    group = 32
    codes = torch.randint(0, 16, (3072, 768), dtype=torch.int32)
    packed = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
    scales_zeros = torch.rand(768 // group, 3072, 2, dtype=torch.bfloat16)
    for rows in (197, 1576):
        x = torch.randn(rows, 768)
        calls = {name: partial(layer, x) for name, layer in layers.items()}
        calls['aten int4 weight-only (bf16)'] = partial(torch._weight_int4pack_mm_for_cpu, x.bfloat16(), packed, group,
                                                        scales_zeros)
        with torch.inference_mode():
            stats = interleaved(calls, repeats, warmup=1)
        for name, s in stats.items():
            print(ratio_line(f'{rows} rows {name} / fp32', s, stats['fp32'], 0.6))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', default='snnet_deit_tsb')
    parser.add_argument('--routes', type=int, nargs='+', default=None,
                        help='route ids (default: the 3 largest by MACs, the median and the smallest)')
    parser.add_argument('--batch-sizes', type=int, nargs='+', default=[1, 8])
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--threads', type=int, default=None)
    parser.add_argument('--compare', action='store_true', help='also compare backends on the largest route')
    parser.add_argument('--kernels', action='store_true', help='only compare the kernels on one DeiT-B layer')
    args = parser.parse_args(argv)
    setup_torch(args.threads)
    if args.kernels:
        compare_kernels(args.repeats)
        return
    model = timm.create_model(args.model).eval()
    routes = args.routes or default_routes(model, 5)
    quantized = {s: timm_stitch.quantize(model, s) for s in SCHEMES}
    print(f'== quantized routes: {args.model}, {model.num_routes} routes, torch {torch.__version__}, '
          f'{torch.get_num_threads()} threads, engine {torch.backends.quantized.engine} ==')
    fp32 = state_bytes(model)
    for scheme, q in quantized.items():
        print(f'memory {scheme}: {state_bytes(q) / 2**20:8.1f} MiB / fp32 {fp32 / 2**20:8.1f} MiB = '
              f'{state_bytes(q) / fp32:.3f}')
    size = model.pretrained_cfg['input_size']
    macs = {r.id: r.macs for r in model.counted_routes()}
    for bs in args.batch_sizes:
        x = torch.randn(bs, *size)
        for k in routes:
            calls = {'fp32': partial(model, x, stitch_id=k)}
            calls.update((s, partial(q, x, stitch_id=k)) for s, q in quantized.items())
            with torch.inference_mode():
                stats = interleaved(calls, args.repeats, warmup=1)
            for scheme in SCHEMES:
                print(ratio_line(f'bs{bs} route {k:>3} ({macs[k] / 1e9:5.2f} GMACs) {scheme} / fp32', stats[scheme],
                                 stats['fp32'], 0.6))
    if args.compare:
        print('== backends on the largest route, exported ==')
        compare_backends(model, max(routes, key=macs.get), args.batch_sizes, args.repeats)


if __name__ == '__main__':
    main()
