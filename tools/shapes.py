"""The target models' shapes, in one place: Qwen2.5-0.5B and SmolLM2-135M.

The GPU-readiness compile sweep (``python -m tools.aot``), the benchmarks (random-init models of
these architectures) and the kernel tests at real sizes all read them from here. Values are the
models' published ``config.json`` fields; names are the ids the benchmarks record.

Plain data: importing this module imports neither torch nor perk_kernels (the benchmarks' conftest
imports it before it sets ``TRITON_INTERPRET``).
"""

from __future__ import annotations

from dataclasses import dataclass

@dataclass(frozen=True)
class ModelShape:
    """A decoder's shapes: what the kernels see and what a transformers config needs."""

    name: str
    family: str  # the transformers config family: "qwen2" or "llama"
    d_model: int
    d_ff: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab: int
    qkv_bias: bool  # q_proj, k_proj and v_proj have a bias (Qwen2)
    rope_theta: float
    max_positions: int

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def d_kv(self) -> int:
        """Width of k_proj / v_proj: key/value heads x head dim (grouped-query attention)."""
        return self.n_kv_heads * self.head_dim

    def projections(self) -> list[tuple[str, int, int, bool]]:
        """(layer, d_in, d_out, bias) of one decoder layer's LoRA targets, in the model's module
        order (the order of perk's adapter layout)."""
        d, f, kv, b = self.d_model, self.d_ff, self.d_kv, self.qkv_bias
        return [
            ("q_proj", d, d, b), ("k_proj", d, kv, b), ("v_proj", d, kv, b), ("o_proj", d, d, False),
            ("gate_proj", d, f, False), ("up_proj", d, f, False), ("down_proj", f, d, False),
        ]  # fmt: skip

    def adapter_group_sizes(self, rank: int, n_layers: int | None = None) -> list[int]:
        """Sizes of the tensor groups of a flat adapter on every projection of ``n_layers`` layers
        (default: all): A (r x d_in) then B (d_out x r) of each, as :class:`perk.lora.AdapterLayout`
        lays them out."""
        layers = self.n_layers if n_layers is None else n_layers
        one_layer = [size for _, d_in, d_out, _ in self.projections() for size in (rank * d_in, d_out * rank)]
        return one_layer * layers

    def transformers_config(self) -> dict:
        """The transformers config fields of the architecture (``family`` names the config class)."""
        return dict(
            family=self.family, hidden_size=self.d_model, intermediate_size=self.d_ff,
            num_hidden_layers=self.n_layers, num_attention_heads=self.n_heads, num_key_value_heads=self.n_kv_heads,
            vocab_size=self.vocab, tie_word_embeddings=True, rope_theta=self.rope_theta,
            max_position_embeddings=self.max_positions,
        )  # fmt: skip


QWEN2_5_0_5B = ModelShape(
    "qwen2.5-0.5b", "qwen2", d_model=896, d_ff=4864, n_layers=24, n_heads=14, n_kv_heads=2, vocab=151_936,
    qkv_bias=True, rope_theta=1_000_000.0, max_positions=32_768,
)
SMOLLM2_135M = ModelShape(
    "smollm2-135m", "llama", d_model=576, d_ff=1536, n_layers=30, n_heads=9, n_kv_heads=3, vocab=49_152,
    qkv_bias=False, rope_theta=100_000.0, max_positions=8192,
)
MODELS = {shape.name: shape for shape in (QWEN2_5_0_5B, SMOLLM2_135M)}
