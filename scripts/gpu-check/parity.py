#!/usr/bin/env python3
"""Compare two `medakv compress` outputs of one cache, CPU backend against CUDA, by the parity rule of docs/cuda.md.

    parity.py CPU.safetensors CUDA.safetensors [--exact]

--exact (a cache with precomputed statistics): every tensor equal bit for
bit. Otherwise (statistics from queries): each layer's budget within one
token of the CPU's, at least 99% of the kept positions the same (per layer
and kv head, as sets), entropies within 1e-4 relative (plus 1e-6), and every
layer whose budget and positions agree equal to the CPU's bit for bit
(keys, values, positions). Prints one line; exit status 0 when the rule
holds, 1 when it does not, 2 when a file cannot be read.

The standard library only: the GPU machine has Python, not NumPy.
"""

from __future__ import annotations

import array
import json
import struct
import sys


def read(path: str) -> tuple[dict, dict]:
    """(metadata, {name: (dtype, shape, bytes)}) of a safetensors file."""
    with open(path, "rb") as f:
        data = f.read()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    base = 8 + n
    meta = header.pop("__metadata__", {})
    tensors = {name: (t["dtype"], t["shape"], data[base + t["data_offsets"][0]:base + t["data_offsets"][1]])
               for name, t in header.items()}
    return meta, tensors


def numbers(raw: bytes, typecode: str) -> list:
    """Little-endian int32 ("i") or float32 ("f") values."""
    a = array.array(typecode)
    a.frombytes(raw)
    if sys.byteorder != "little":
        a.byteswap()
    return a.tolist()


def main(argv: list[str]) -> int:
    exact = "--exact" in argv
    paths = [a for a in argv if a != "--exact"]
    if len(paths) != 2:
        print(__doc__.split("\n\n")[1].strip(), file=sys.stderr)
        return 2
    try:
        (_, cpu), (_, gpu) = read(paths[0]), read(paths[1])
    except (OSError, ValueError, KeyError, struct.error) as e:
        print(f"parity: cannot read the outputs: {e}")
        return 2
    if exact:
        differ = sorted(name for name in cpu.keys() | gpu.keys() if cpu.get(name) != gpu.get(name))
        if differ:
            print(f"parity: FAIL (exact): {len(differ)} tensors differ, first {differ[:4]}")
            return 1
        print(f"parity: ok (exact): all {len(cpu)} tensors equal bit for bit")
        return 0

    layers = sorted({int(name.split(".")[1]) for name in cpu if name.startswith("layer.")})
    if layers != sorted({int(name.split(".")[1]) for name in gpu if name.startswith("layer.")}):
        print("parity: FAIL: the outputs have different layers")
        return 1
    problems, kept, same, exact_layers = [], 0, 0, 0
    for layer in layers:
        def t(side, what):
            return side[f"layer.{layer}.{what}"]
        b_cpu, b_gpu = numbers(t(cpu, "budget")[2], "i")[0], numbers(t(gpu, "budget")[2], "i")[0]
        if abs(b_cpu - b_gpu) > 1:
            problems.append(f"layer {layer} budget {b_gpu} against {b_cpu}")
        e_cpu, e_gpu = numbers(t(cpu, "entropy")[2], "f")[0], numbers(t(gpu, "entropy")[2], "f")[0]
        if abs(e_cpu - e_gpu) > 1e-4 * abs(e_cpu) + 1e-6:
            problems.append(f"layer {layer} entropy {e_gpu} against {e_cpu}")
        heads = t(cpu, "positions")[1][0]
        p_cpu, p_gpu = numbers(t(cpu, "positions")[2], "i"), numbers(t(gpu, "positions")[2], "i")
        for h in range(heads):
            a = set(p_cpu[h * b_cpu:(h + 1) * b_cpu])
            b = set(p_gpu[h * b_gpu:(h + 1) * b_gpu])
            kept += max(len(a), len(b))
            same += len(a & b)
        if b_cpu == b_gpu and p_cpu == p_gpu:
            for what in ("key", "value"):
                if t(cpu, what) != t(gpu, what):
                    problems.append(f"layer {layer} {what} differs though every position agrees")
            exact_layers += 1
    agreement = same / kept if kept else 1.0
    if agreement < 0.99:
        problems.append(f"kept positions agree {100 * agreement:.2f}% (< 99%)")
    summary = (f"{len(layers)} layers, positions agree {100 * agreement:.2f}%, {exact_layers} layers bit for bit")
    if problems:
        print(f"parity: FAIL: {summary}; " + "; ".join(problems[:6]))
        return 1
    print(f"parity: ok: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
