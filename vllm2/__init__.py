"""vllm2: VisionLLM v2's super link — one multimodal LLM that chats and routes to task decoders."""

from .config import VLLM2Config, load_config
from .modeling import VisionLLMv2Config, VisionLLMv2Model, VisionLLMv2Output, build_model
from .processor import Sample, VisionLLMv2Processor

__all__ = [
    "VLLM2Config",
    "load_config",
    "VisionLLMv2Config",
    "VisionLLMv2Model",
    "VisionLLMv2Output",
    "build_model",
    "Sample",
    "VisionLLMv2Processor",
]
__version__ = "0.1.0"
