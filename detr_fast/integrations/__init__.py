"""Integrations with other DETR implementations: `detr_fast.integrations.transformers.patch(model)`."""
