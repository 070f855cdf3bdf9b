"""raykd: distil, reinforce, quantize and evaluate LLMs on Ray."""

__version__ = "0.1.0"
