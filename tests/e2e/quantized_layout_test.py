"""Checkpoints written by `qshard quantize` read back by an independent decoder.

The decoders below follow the public format descriptions (AutoGPTQ qlinear pack(),
AutoAWQ WQLinear_GEMM, compressed-tensors float-/int-quantized; see
../shared/docs/reference/quant-formats-and-anchors.md), written in numpy without any qshard
code, so a layout mistake (transposed packing, missing v1 "+1", wrong AWQ nibble order) shows
up as a large reconstruction error against the base model's own weights.

usage: quantized_layout_test.py QSHARD BASE_MODEL CALIB_TEXT
"""

import json
import os
import struct
import subprocess
import sys
import tempfile

try:
    import numpy as np
except ImportError:  # python3-numpy is installed by scripts/setup.sh
    print("SKIP: numpy missing")
    sys.exit(77)


def fail(msg):
    print("FAIL: " + msg, file=sys.stderr)
    sys.exit(1)


DTYPES = {"F32": np.float32, "F16": np.float16, "I32": np.int32, "I8": np.int8,
          "U8": np.uint8, "BF16": np.uint16, "F8_E4M3": np.uint8, "I64": np.int64}


def read_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    body = data[8 + n:]
    out = {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        a, b = e["data_offsets"]
        arr = np.frombuffer(body[a:b], dtype=DTYPES[e["dtype"]]).reshape(e["shape"])
        if e["dtype"] == "BF16":
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        out[name] = (e["dtype"], arr)
    return out


def read_model(folder):
    tensors = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            tensors.update(read_safetensors(os.path.join(folder, f)))
    return tensors


def e4m3_to_float(codes):
    c = codes.astype(np.int64)
    sign = np.where(c & 0x80, -1.0, 1.0)
    exp = (c >> 3) & 0xF
    man = c & 0x7
    val = np.where(exp == 0, man / 8.0 * 2.0 ** -6, (1.0 + man / 8.0) * 2.0 ** (exp - 7.0))
    return sign * val


def unpack_along(words, bits, axis):
    """int32 words -> codes, element j of each word at bits [bits*j, bits*(j+1))."""
    per = 32 // bits
    w = words.astype(np.uint32)
    parts = [((w >> (bits * j)) & ((1 << bits) - 1)) for j in range(per)]
    stacked = np.stack(parts, axis=axis + 1)  # [..., word, j, ...]
    shape = list(words.shape)
    shape[axis] *= per
    return stacked.reshape(shape).astype(np.int64)


def gptq_dequant(t, prefix, cfg):
    bits = cfg["bits"]
    q = unpack_along(t[prefix + ".qweight"][1], bits, 0)        # [K, N], packed along K
    z = unpack_along(t[prefix + ".qzeros"][1], bits, 1)         # [G, N], packed along N
    if cfg.get("checkpoint_format", "gptq") == "gptq":
        z = z + 1                                               # v1 stores zero - 1
    s = t[prefix + ".scales"][1].astype(np.float64)             # [G, N]
    g = t[prefix + ".g_idx"][1].astype(np.int64)                # [K]
    w = s[g, :] * (q - z[g, :])                                 # [K, N]
    return w.T, s[g, :].T                                       # [N, K] and its scales


AWQ_REVERSE = [0, 4, 1, 5, 2, 6, 3, 7]


def awq_unpack(words):
    """[R, C] int32 -> [R, 8C]: nibble i holds column order_map[i]."""
    nib = unpack_along(words, 4, 1)  # natural order: column 8c + i = nibble i
    r, c8 = nib.shape
    nib = nib.reshape(r, c8 // 8, 8)
    out = nib[:, :, AWQ_REVERSE]      # column j of a word = nibble reverse[j]
    return out.reshape(r, c8)


def awq_dequant(t, prefix, cfg):
    q = awq_unpack(t[prefix + ".qweight"][1])           # [K, N]
    z = awq_unpack(t[prefix + ".qzeros"][1])            # [G, N]
    s = t[prefix + ".scales"][1].astype(np.float64)     # [G, N]
    gs = cfg["group_size"]
    g = np.arange(q.shape[0]) // gs
    return (s[g, :] * (q - z[g, :])).T


def rel_err(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def quantize(qshard, base, out, args):
    cmd = [qshard, "quantize", "--model", base, "--out", out, *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        fail("%s\n%s" % (" ".join(cmd), r.stderr[-3000:]))
    with open(os.path.join(out, "config.json")) as f:
        return json.load(f)["quantization_config"], read_model(out)


def main():
    qshard, base_dir, calib = sys.argv[1:4]
    base = read_model(base_dir)
    layers = 6
    linears = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    tmp = tempfile.mkdtemp(prefix="qshard-layout-")

    # GPTQ layout, round-to-nearest: every weight within half a step of the original.
    for variant, args in [("sym-v1", ["--method", "rtn"]),
                          ("asym-v2", ["--method", "rtn", "--asym", "--group-size", "64"]),
                          ("8bit", ["--method", "rtn", "--bits", "8"])]:
        cfg, t = quantize(qshard, base_dir, os.path.join(tmp, "gptq-" + variant), args)
        if cfg["quant_method"] != "gptq":
            fail("rtn should write quant_method gptq: %s" % cfg)
        for l in range(layers):
            for lin in linears:
                p = "model.layers.%d.%s" % (l, lin)
                w0 = base[p + ".weight"][1].astype(np.float64)
                w, s = gptq_dequant(t, p, cfg)
                if w.shape != w0.shape:
                    fail("%s %s: dequantized %s, base %s" % (variant, p, w.shape, w0.shape))
                # Half a step, plus the f16 rounding of the scale (relative 2^-11) times
                # the largest code distance from the zero (2^bits / 2... 2^bits - 1).
                maxq = (1 << cfg["bits"]) - 1
                bad = np.abs(w - w0) > s * (0.5 + maxq * 2.0 ** -11) + 1e-7
                if bad.any():
                    fail("gptq %s %s: %d weights beyond half a quantization step"
                         % (variant, p, int(bad.sum())))
        print("ok gptq %s (checkpoint_format %s)" % (variant, cfg["checkpoint_format"]))

    # GPTQ with act-order: the non-monotone g_idx is honoured by the plain decoder.
    cfg, t = quantize(qshard, base_dir, os.path.join(tmp, "gptq-act"),
                      ["--method", "gptq", "--desc-act", "--calib", calib,
                       "--calib-tokens", "2048"])
    p = "model.layers.0.mlp.down_proj"
    g = t[p + ".g_idx"][1]
    if np.all(np.diff(g) >= 0):
        fail("desc_act g_idx is monotone")
    err = rel_err(gptq_dequant(t, p, cfg)[0], base[p + ".weight"][1].astype(np.float64))
    # GPTQ moves weights to cancel output error (typically 0.15-0.2 relative to the
    # originals); a wrong g_idx lookup gives errors of order 1.
    if err > 0.3:
        fail("gptq act-order %s: relative error %.3f" % (p, err))
    print("ok gptq desc_act (relative error %.3f)" % err)

    # AWQ: scales are folded into the norms, so compare (W_q * norm_q) with (W * norm).
    cfg, t = quantize(qshard, base_dir, os.path.join(tmp, "awq"),
                      ["--method", "awq", "--calib", calib, "--calib-tokens", "2048",
                       "--awq-max-tokens", "1024"])
    if cfg["quant_method"] != "awq" or cfg["version"] != "gemm" or not cfg["zero_point"]:
        fail("awq config: %s" % cfg)
    for l in range(layers):
        for lin, norm in [("self_attn.q_proj", "input_layernorm"),
                          ("self_attn.v_proj", "input_layernorm"),
                          ("mlp.gate_proj", "post_attention_layernorm")]:
            p = "model.layers.%d.%s" % (l, lin)
            n = "model.layers.%d.%s.weight" % (l, norm)
            want = base[p + ".weight"][1].astype(np.float64) * base[n][1][None, :]
            got = awq_dequant(t, p, cfg) * t[n][1].astype(np.float64)[None, :]
            err = rel_err(got, want)
            if err > 0.15:
                fail("awq %s: relative error %.3f (interleave or zeros wrong?)" % (p, err))
    print("ok awq")

    # compressed-tensors fp8 / int8, per channel.
    for method in ["fp8", "int8"]:
        cfg, t = quantize(qshard, base_dir, os.path.join(tmp, method), ["--method", method])
        fmt = "float-quantized" if method == "fp8" else "int-quantized"
        group = cfg["config_groups"]["group_0"]
        if (cfg["quant_method"] != "compressed-tensors" or cfg["format"] != fmt
                or group["weights"]["strategy"] != "channel"
                or group["input_activations"]["strategy"] != "token"
                or not group["input_activations"]["dynamic"] or cfg["ignore"] != ["lm_head"]):
            fail("%s config: %s" % (method, cfg))
        for l in range(layers):
            for lin in linears:
                p = "model.layers.%d.%s" % (l, lin)
                w0 = base[p + ".weight"][1].astype(np.float64)
                dt, codes = t[p + ".weight"]
                s = t[p + ".weight_scale"][1].astype(np.float64)  # [N, 1]
                if method == "fp8":
                    if dt != "F8_E4M3":
                        fail("%s: dtype %s" % (p, dt))
                    w = e4m3_to_float(codes) * s
                    # e4m3: 3 mantissa bits, relative step 1/8 (half: 1/16), subnormals 2^-9.
                    tol = np.abs(w0) / 16 + s * 2.0 ** -10 + 1e-9
                else:
                    if dt != "I8":
                        fail("%s: dtype %s" % (p, dt))
                    w = codes.astype(np.float64) * s
                    # Half a step; w / s is rounded in fp32 (a value 2e-6 below a .5 tie
                    # can land on it and round away).
                    tol = (0.5 + 1e-5) * s + 1e-9
                if np.any(np.abs(w - w0) > tol):
                    fail("%s %s: weights beyond the rounding bound" % (method, p))
        print("ok %s" % method)


if __name__ == "__main__":
    main()
