"""DETR's post-norm transformer: multi-head attention through detr_fast.ops, encoder and decoder layers.

Module and parameter names follow transformers v5 (`self_attn.q_proj`, `mlp.fc1`, `final_layer_norm`, ...), so
state dicts load without renaming.
"""

import random

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .. import ops, reference
from .config import DetrConfig

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "swish": F.silu, "tanh": torch.tanh}


def activation(name: str):
    """The elementwise function named by config.activation_function; ValueError listing the known names."""
    if name not in ACTIVATIONS:
        raise ValueError(f"activation_function must be one of {sorted(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]


def stacked(*linears: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weights [sum R_i, C] and biases [sum R_i] (None if any linear has none) of linears, concatenated."""
    if len(linears) == 1:  # no copy
        return linears[0].weight, linears[0].bias
    weight = torch.cat([linear.weight for linear in linears])
    biases = [linear.bias for linear in linears]
    return weight, None if any(b is None for b in biases) else torch.cat(biases)


def project_self_attention(
    hidden_states: torch.Tensor,
    pos: torch.Tensor | None,
    q_proj: nn.Linear,
    k_proj: nn.Linear,
    v_proj: nn.Linear,
    heads: tuple[int, int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k from hidden_states + pos and v from hidden_states, in one ops.qkv_projection.

    Args:
        hidden_states, pos: [B, L, C]; heads: (H, D) with H * D = C.
    Returns:
        q, k, v: [B, L, H, D] views of one [B, L, 3C] projection.
    """
    batch, length, channels = hidden_states.shape
    weight, bias = stacked(q_proj, k_proj, v_proj)  # [3C, C]
    qkv = ops.qkv_projection(hidden_states, pos, weight, bias, pos_rows=2 * channels)  # [B, L, 3C]
    return qkv.view(batch, length, 3, *heads).unbind(2)


def project_cross_attention(
    hidden_states: torch.Tensor,
    query_pos: torch.Tensor | None,
    memory: torch.Tensor,
    memory_pos: torch.Tensor | None,
    q_proj: nn.Linear,
    k_proj: nn.Linear,
    v_proj: nn.Linear,
    heads: tuple[int, int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q from hidden_states + query_pos; k from memory + memory_pos and v from memory, in one projection.

    Args:
        hidden_states, query_pos: [B, L, C]; memory, memory_pos: [B, S, C]; heads: (H, D).
    Returns:
        q: [B, L, H, D]; k, v: [B, S, H, D].
    """
    batch, length, channels = hidden_states.shape
    q = ops.qkv_projection(hidden_states, query_pos, *stacked(q_proj), pos_rows=channels).view(batch, length, *heads)
    weight, bias = stacked(k_proj, v_proj)  # [2C, C]
    kv = ops.qkv_projection(memory, memory_pos, weight, bias, pos_rows=channels)  # [B, S, 2C]
    k, v = kv.view(batch, memory.shape[1], 2, *heads).unbind(2)
    return q, k, v


class MultiheadAttention(nn.Module):
    """Multi-head attention where queries and keys get position embeddings added and values do not.

    The projections go through ops.qkv_projection (which adds the position embedding inside the projection) and
    the attention through ops.attention, both in the [B, L, H, D] layout, so no transpose is materialized.
    """

    def __init__(self, hidden_size: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.dropout = dropout
        self.k_proj = nn.Linear(hidden_size, hidden_size)
        self.v_proj = nn.Linear(hidden_size, hidden_size)
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.o_proj = nn.Linear(hidden_size, hidden_size)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: torch.Tensor | None,
        key_value_states: torch.Tensor | None = None,
        key_position_embeddings: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Self-attention when key_value_states is None, else cross-attention.

        Args:
            hidden_states: [B, L, C] queries; position_embeddings: [B, L, C] added to the queries (and to the keys
                in self-attention).
            key_value_states: [B, S, C] or None; key_position_embeddings: [B, S, C] added to the keys.
            key_padding_mask: [B, S] bool, True = padding.
            output_attentions: also return the attention weights. The fused kernel never materializes them, so this
                call takes the reference, which does.
        Returns:
            [B, L, C], and the weights [B, H, L, S] (after dropout) or None.
        """
        batch, length, channels = hidden_states.shape
        heads = (self.num_heads, self.head_dim)
        if key_value_states is None:
            q, k, v = project_self_attention(
                hidden_states, position_embeddings, self.q_proj, self.k_proj, self.v_proj, heads
            )  # [B, L, H, D] each
        else:
            q, k, v = project_cross_attention(
                hidden_states,
                position_embeddings,
                key_value_states,
                key_position_embeddings,
                self.q_proj,
                self.k_proj,
                self.v_proj,
                heads,
            )
        dropout_p = self.dropout if self.training else 0.0
        weights = None
        if output_attentions:
            out, weights = reference.attention_with_weights(q, k, v, key_padding_mask, dropout_p)  # [B, L, H, D]
        else:
            out = ops.attention(q, k, v, key_padding_mask, dropout_p=dropout_p)  # [B, L, H, D]
        return self.o_proj(out.reshape(batch, length, channels)), weights


class MLP(nn.Module):
    """fc1 -> activation -> dropout(activation_dropout) -> fc2 -> dropout(dropout)."""

    def __init__(self, config: DetrConfig, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.fc2 = nn.Linear(intermediate_size, hidden_size)
        self.activation = activation(config.activation_function)
        self.activation_dropout = config.activation_dropout
        self.dropout = config.dropout

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[..., C] -> [..., C]."""
        hidden_states = self.activation(self.fc1(hidden_states))
        hidden_states = F.dropout(hidden_states, p=self.activation_dropout, training=self.training)
        hidden_states = self.fc2(hidden_states)
        return F.dropout(hidden_states, p=self.dropout, training=self.training)


class EncoderLayer(nn.Module):
    """Post-norm: x = norm(x + drop(self_attn(x))); x = norm(x + mlp(x))."""

    def __init__(self, config: DetrConfig):
        super().__init__()
        self.self_attn = MultiheadAttention(config.d_model, config.encoder_attention_heads, config.attention_dropout)
        self.self_attn_layer_norm = nn.LayerNorm(config.d_model)
        self.mlp = MLP(config, config.d_model, config.encoder_ffn_dim)
        self.final_layer_norm = nn.LayerNorm(config.d_model)
        self.dropout = config.dropout

    def forward(
        self, hidden_states: torch.Tensor, pos: torch.Tensor, key_padding_mask: torch.Tensor, output_attentions: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """hidden_states, pos [B, S, C]; key_padding_mask [B, S] -> [B, S, C], and the attention weights [B, H, S, S]
        with output_attentions."""
        attended, weights = self.self_attn(hidden_states, pos, key_padding_mask=key_padding_mask,
                                           output_attentions=output_attentions)  # fmt: skip
        hidden_states = self.self_attn_layer_norm(hidden_states + F.dropout(attended, self.dropout, self.training))
        return self.final_layer_norm(hidden_states + self.mlp(hidden_states)), weights


class DecoderLayer(nn.Module):
    """Post-norm self-attention over the queries, cross-attention to the encoder memory, then the MLP."""

    def __init__(self, config: DetrConfig):
        super().__init__()
        self.self_attn = MultiheadAttention(config.d_model, config.decoder_attention_heads, config.attention_dropout)
        self.self_attn_layer_norm = nn.LayerNorm(config.d_model)
        self.encoder_attn = MultiheadAttention(config.d_model, config.decoder_attention_heads, config.attention_dropout)
        self.encoder_attn_layer_norm = nn.LayerNorm(config.d_model)
        self.mlp = MLP(config, config.d_model, config.decoder_ffn_dim)
        self.final_layer_norm = nn.LayerNorm(config.d_model)
        self.dropout = config.dropout

    def forward(
        self,
        hidden_states: torch.Tensor,
        query_pos: torch.Tensor,
        memory: torch.Tensor,
        memory_pos: torch.Tensor,
        memory_padding_mask: torch.Tensor,
        output_attentions: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """hidden_states, query_pos [B, N, C]; memory, memory_pos [B, S, C]; memory_padding_mask [B, S] ->
        [B, N, C], and with output_attentions the self- and cross-attention weights [B, H, N, N], [B, H, N, S]."""
        attended, self_weights = self.self_attn(hidden_states, query_pos, output_attentions=output_attentions)
        hidden_states = self.self_attn_layer_norm(hidden_states + F.dropout(attended, self.dropout, self.training))
        attended, cross_weights = self.encoder_attn(
            hidden_states, query_pos, memory, memory_pos, memory_padding_mask, output_attentions
        )
        hidden_states = self.encoder_attn_layer_norm(hidden_states + F.dropout(attended, self.dropout, self.training))
        return self.final_layer_norm(hidden_states + self.mlp(hidden_states)), self_weights, cross_weights


def _keep_layer(layerdrop: float, training: bool) -> bool:
    # LayerDrop decides on the host with Python's RNG: a tensor draw would need a sync to branch on.
    return not (training and layerdrop > 0 and random.random() < layerdrop)


def _run(module: nn.Module, layer: nn.Module, *args):
    """layer(*args), recomputed in the backward instead of keeping its activations when the module checkpoints
    (gradient_checkpointing, in training). The RNG state is restored for the recomputation: the same dropout."""
    if module.gradient_checkpointing and module.training and torch.is_grad_enabled():
        return checkpoint(layer, *args, use_reentrant=False)
    return layer(*args)


class Encoder(nn.Module):
    def __init__(self, config: DetrConfig):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.encoder_layers))
        self.dropout = 0.0 if config.original_detr else config.dropout
        self.layerdrop = config.encoder_layerdrop
        self.gradient_checkpointing = False

    def forward(
        self,
        features: torch.Tensor,
        pos: torch.Tensor,
        key_padding_mask: torch.Tensor,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None, tuple[torch.Tensor, ...] | None]:
        """features, pos [B, S, C]; key_padding_mask [B, S] (True = padding) -> memory [B, S, C], and on request
        the hidden states (the input of every layer, then the output: [B, S, C] each) and the attention weights
        ([B, H, S, S] per layer)."""
        hidden_states = F.dropout(features, self.dropout, self.training)
        states = [hidden_states] if output_hidden_states else None
        attentions = [] if output_attentions else None
        for layer in self.layers:
            if _keep_layer(self.layerdrop, self.training):
                hidden_states, weights = _run(self, layer, hidden_states, pos, key_padding_mask, output_attentions)
                if output_hidden_states:
                    states.append(hidden_states)
                if output_attentions:
                    attentions.append(weights)
        return hidden_states, _as_tuple(states), _as_tuple(attentions)


def _as_tuple(values: list | None) -> tuple | None:
    return None if values is None else tuple(values)


class Decoder(nn.Module):
    def __init__(self, config: DetrConfig):
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.decoder_layers))
        self.layernorm = nn.LayerNorm(config.d_model)
        self.auxiliary_loss = config.auxiliary_loss
        self.feed_normed = config.auxiliary_loss and not config.original_detr
        self.layerdrop = config.decoder_layerdrop
        self.gradient_checkpointing = False

    def forward(
        self,
        query_pos: torch.Tensor,
        memory: torch.Tensor,
        memory_pos: torch.Tensor,
        memory_padding_mask: torch.Tensor,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, tuple | None, tuple | None, tuple | None]:
        """Decode the object queries.

        Args:
            query_pos: [B, N, C] learned query embeddings (the decoder input itself starts at zero).
            memory, memory_pos: [B, S, C]; memory_padding_mask: [B, S].
            output_hidden_states, output_attentions: also return those.
        Returns:
            last_hidden_state [B, N, C] (the last layer's output, layer-normed); intermediate [L, B, N, C], the
            layer-normed output of every layer, with auxiliary_loss (else None); and on request the hidden states
            (every layer's input, then the last output, as transformers records them), the self-attention weights
            [B, H, N, N] and the cross-attention weights [B, H, N, S] of every layer.
        """
        hidden_states = torch.zeros_like(query_pos)
        intermediate = []
        states = [hidden_states] if output_hidden_states else None
        self_attentions, cross_attentions = ([], []) if output_attentions else (None, None)
        for layer in self.layers:
            if _keep_layer(self.layerdrop, self.training):
                hidden_states, self_weights, cross_weights = _run(
                    self, layer, hidden_states, query_pos, memory, memory_pos, memory_padding_mask, output_attentions
                )
                if output_hidden_states:
                    states.append(hidden_states)
                if output_attentions:
                    self_attentions.append(self_weights)
                    cross_attentions.append(cross_weights)
            if self.auxiliary_loss:
                normed = self.layernorm(hidden_states)
                intermediate.append(normed)
                if self.feed_normed:
                    hidden_states = normed
        # transformers norms the stream once more here (the last output twice when feed_normed).
        last_hidden_state = self.layernorm(hidden_states)
        if output_hidden_states:
            states[-1] = last_hidden_state  # transformers' hidden states end with the last hidden state
        return (
            last_hidden_state,
            torch.stack(intermediate) if self.auxiliary_loss else None,
            _as_tuple(states),
            _as_tuple(self_attentions),
            _as_tuple(cross_attentions),
        )
