"""medtune: fine-tune Chinese medical LLMs with LoRA/QLoRA."""

import logging

__version__ = "0.1.0"

# Importing peft imports bitsandbytes, which logs on a machine without its optional "kernels" package that a
# CPU kernel failed to load: nothing medtune uses. Set here, before any medtune module imports peft.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
