"""The LLaMA-family decoder (BitNet b1.58 and OneBit variants are config flags)."""

from bitserve.model.llama import LlamaForCausalLM

__all__ = ["LlamaForCausalLM"]
