"""flexoffload: a FlexInfer memory-budgeted weight-offload model loader for vLLM."""
__version__ = "0.1.0"
