"""Generation engines behind one small protocol: transformers on CPU here, vLLM where it exists."""

from miniray.rl.engines.base import Generation, GenerationEngine
from miniray.rl.engines.hf import HFGenerationEngine

__all__ = ["Generation", "GenerationEngine", "HFGenerationEngine"]
