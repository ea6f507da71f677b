"""perk: PERK (Parameter-Efficient Reasoning over Knowledge) on Hugging Face causal LMs.

A long context is written into a LoRA adapter by a few gradient steps at test time; questions
are then answered from the adapted model without the context in the prompt.
"""

from perk.config import PerkConfig
from perk.engine import PerkModel
from perk.memory import Memory
from perk.models import load_base_model, load_tokenizer

__all__ = ["Memory", "PerkConfig", "PerkModel", "load_base_model", "load_tokenizer"]
