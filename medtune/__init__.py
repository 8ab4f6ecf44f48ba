"""medtune: fine-tune Chinese medical LLMs with LoRA/QLoRA."""

__version__ = "0.1.0"
