"""Models the RL stack builds locally (no weights are downloaded)."""

from miniray.rl.models.tiny import (
    QWEN25_05B,
    char_tokenizer,
    encode_example,
    load,
    pretrain,
    pretrain_encoded,
    qwen25_05b_shaped,
    save,
    tiny_qwen2,
)

__all__ = [
    "QWEN25_05B",
    "char_tokenizer",
    "encode_example",
    "load",
    "pretrain",
    "pretrain_encoded",
    "qwen25_05b_shaped",
    "save",
    "tiny_qwen2",
]
