"""safealign: safe RLHF of language models from the command line."""

__version__ = "0.1.0"
