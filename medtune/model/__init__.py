"""The model: loading a base (dtype, quantization, LoRA), adapters on it, reward models, the tiny test base."""
