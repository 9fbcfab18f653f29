"""Models the RL stack builds locally (no weights are downloaded)."""

from miniray.rl.models.tiny import char_tokenizer, encode_example, load, pretrain, save, tiny_qwen2

__all__ = ["char_tokenizer", "encode_example", "load", "pretrain", "save", "tiny_qwen2"]
