"""Position embeddings of the feature map: DETR's normalized sine embedding and its learned embedding."""

import math

import torch
from torch import nn


class SinePositionEmbedding(nn.Module):
    """2-D sine/cosine embedding of the cumulative count of real pixels along y and x, normalized to [0, 2π]."""

    def __init__(self, num_features: int, temperature: float = 10000.0, scale: float = 2 * math.pi, eps: float = 1e-6):
        super().__init__()
        self.num_features = num_features
        self.temperature = temperature
        self.scale = scale
        self.eps = eps

    def forward(self, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """mask [B, h, w] bool (True = real) -> [B, h*w, 2 * num_features] (y features then x features)."""
        real = mask.to(dtype)
        y_embed = real.cumsum(1)  # [B, h, w]
        x_embed = real.cumsum(2)
        # Normalize by the real extent of each image so padding does not stretch the embedding.
        y_embed = y_embed / (y_embed[:, -1:, :] + self.eps) * self.scale
        x_embed = x_embed / (x_embed[:, :, -1:] + self.eps) * self.scale
        dim_t = torch.arange(self.num_features, dtype=torch.int64, device=mask.device).to(dtype)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_features)
        pos_x = x_embed[:, :, :, None] / dim_t  # [B, h, w, F]
        pos_y = y_embed[:, :, :, None] / dim_t
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).flatten(1, 2)  # [B, h*w, 2F]


class LearnedPositionEmbedding(nn.Module):
    """Learned row and column embeddings (up to 50 each), concatenated x then y."""

    def __init__(self, num_features: int, max_size: int = 50):
        super().__init__()
        self.row_embeddings = nn.Embedding(max_size, num_features)
        self.column_embeddings = nn.Embedding(max_size, num_features)

    def forward(self, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """mask [B, h, w] -> [B, h*w, 2 * num_features] (x features then y features)."""
        batch, height, width = mask.shape
        max_size = self.row_embeddings.num_embeddings
        if height > max_size or width > max_size:
            raise ValueError(
                f"LearnedPositionEmbedding: feature map {height}x{width} exceeds the {max_size}x{max_size} table"
            )
        x_emb = self.column_embeddings(torch.arange(width, device=mask.device))  # [w, F]
        y_emb = self.row_embeddings(torch.arange(height, device=mask.device))  # [h, F]
        pos = torch.cat([x_emb[None].expand(height, -1, -1), y_emb[:, None].expand(-1, width, -1)], dim=-1)
        return pos.flatten(0, 1)[None].expand(batch, -1, -1).to(dtype)  # [B, h*w, 2F]


def build_position_embedding(kind: str, d_model: int) -> nn.Module:
    """The config's position embedding ("sine" or "learned"): mask [B, h, w] bool -> [B, h*w, d_model]."""
    if kind == "sine":
        return SinePositionEmbedding(d_model // 2)
    if kind == "learned":
        return LearnedPositionEmbedding(d_model // 2)
    raise ValueError(f"position_embedding_type must be 'sine' or 'learned', got {kind!r}")
