#!/usr/bin/env python3
"""Writes the small, hand-made seed inputs under fuzz/seeds/<target>/ (each well under 4 KB).

Run from anywhere: python3 fuzz/make_seeds.py. The files are committed; rerun only to change them.
"""
import json
import struct
from pathlib import Path

SEEDS = Path(__file__).resolve().parent / "seeds"

# GGUF value type ids.
U32, I32, F32, BOOL, STR, ARR = 4, 5, 6, 7, 8, 9


def gguf_str(s):
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def gguf_value(ty, v):
    if ty == U32:
        return struct.pack("<I", v)
    if ty == I32:
        return struct.pack("<i", v)
    if ty == F32:
        return struct.pack("<f", v)
    if ty == BOOL:
        return bytes([1 if v else 0])
    if ty == STR:
        return gguf_str(v)
    if ty == ARR:
        elem_ty, items = v
        return struct.pack("<IQ", elem_ty, len(items)) + b"".join(gguf_value(elem_ty, i) for i in items)
    raise ValueError(ty)


def gguf(metadata, tensors=()):
    """metadata: [(key, type, value)]; tensors: [(name, row-major shape, f32 values)]. GGUF v3."""
    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata))
    for key, ty, v in metadata:
        out += gguf_str(key) + struct.pack("<I", ty) + gguf_value(ty, v)
    data, offset = b"", 0
    for name, shape, values in tensors:
        dims = list(reversed(shape))  # ggml order: fastest-varying first
        out += gguf_str(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        out += struct.pack("<IQ", 0, offset)  # type 0 = F32
        blob = b"".join(struct.pack("<f", x) for x in values)
        blob += b"\0" * (-len(blob) % 32)
        data += blob
        offset += len(blob)
    out += b"\0" * (-len(out) % 32)  # default alignment 32
    return out + data


def safetensors(header, data):
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


def main():
    g = SEEDS / "gguf_header"
    g.mkdir(parents=True, exist_ok=True)
    # 0 tensors, 1 metadata string.
    (g / "min_kv.gguf").write_bytes(gguf([("general.architecture", STR, "llama")]))
    # A complete (tiny) Llama config and gpt2 tokenizer, so Config::from_gguf and
    # Tokenizer::from_gguf both get past their checks and the fuzzer can mutate from there.
    tokens = ["<|endoftext|>", "a", "b", "c", "Ġ", "ab", "Ġa", "abc"]
    d = 8
    meta = [
        ("general.architecture", STR, "llama"),
        ("general.alignment", U32, 32),
        ("llama.block_count", U32, 1),
        ("llama.context_length", U32, 64),
        ("llama.embedding_length", U32, d),
        ("llama.feed_forward_length", U32, 16),
        ("llama.attention.head_count", U32, 2),
        ("llama.attention.head_count_kv", U32, 1),
        ("llama.rope.freq_base", F32, 10000.0),
        ("llama.rope.dimension_count", U32, 4),
        ("llama.attention.layer_norm_rms_epsilon", F32, 1e-5),
        ("tokenizer.ggml.model", STR, "gpt2"),
        ("tokenizer.ggml.pre", STR, "smollm"),
        ("tokenizer.ggml.tokens", ARR, (STR, tokens)),
        ("tokenizer.ggml.token_type", ARR, (I32, [3] + [1] * (len(tokens) - 1))),
        ("tokenizer.ggml.merges", ARR, (STR, ["a b", "Ġ a", "ab c"])),
        ("tokenizer.ggml.bos_token_id", U32, 0),
        ("tokenizer.ggml.eos_token_id", U32, 0),
        ("tokenizer.ggml.add_bos_token", BOOL, False),
    ]
    emb = [((i * 7 + 3) % 11 - 5) / 10 for i in range(len(tokens) * d)]
    (g / "tiny_config_tokenizer.gguf").write_bytes(
        gguf(
            meta,
            [
                ("token_embd.weight", [len(tokens), d], emb),
                ("output_norm.weight", [d], [1.0] * d),
                # Llama 3 style per-frequency rope divisors (head_dim / 2 values), read by Config.
                ("rope_freqs.weight", [2], [1.0, 4.0]),
            ],
        )
    )

    # A SentencePiece vocabulary (tokenizer.ggml.model = llama): scored pieces, a control and a
    # user-defined token, a few byte pieces, so the SentencePiece path gets past its checks.
    pieces = ["<unk>", "<s>", "</s>", "<ud>", "<0x0A>", "<0x41>", "\u2581", "a", "b", "ab", "\u2581a", "\u2581ab"]
    types = [2, 3, 3, 4, 6, 6, 1, 1, 1, 1, 1, 1]
    (g / "tiny_sentencepiece.gguf").write_bytes(
        gguf(
            [
                ("tokenizer.ggml.model", STR, "llama"),
                ("tokenizer.ggml.tokens", ARR, (STR, pieces)),
                ("tokenizer.ggml.scores", ARR, (F32, [-float(i) for i in range(len(pieces))])),
                ("tokenizer.ggml.token_type", ARR, (I32, types)),
                ("tokenizer.ggml.bos_token_id", U32, 1),
                ("tokenizer.ggml.eos_token_id", U32, 2),
                ("tokenizer.ggml.add_space_prefix", BOOL, True),
            ]
        )
    )

    s = SEEDS / "safetensors_header"
    s.mkdir(parents=True, exist_ok=True)
    (s / "one_tensor.safetensors").write_bytes(
        safetensors({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, struct.pack("<2f", 1.0, -2.0))
    )
    (s / "two_tensors_meta.safetensors").write_bytes(
        safetensors(
            {
                "__metadata__": {"format": "pt"},
                "a": {"dtype": "F16", "shape": [2, 2], "data_offsets": [0, 8]},
                "b": {"dtype": "I64", "shape": [1], "data_offsets": [8, 16]},
            },
            bytes(range(16)),
        )
    )
    for p in sorted(SEEDS.rglob("*.*")):
        if p.is_file():
            assert p.stat().st_size < 4096, p
            print(p.relative_to(SEEDS), p.stat().st_size)


if __name__ == "__main__":
    main()
