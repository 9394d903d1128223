"""The ops of the extension detr_fast._C (csrc/ops.cpp registers them all): their fake implementations, which give
the shapes of the outputs to torch.compile and to meta tensors. The extension names this module
(set_python_module), so torch finds them even before detr_fast.ops is imported.

Registered only where the extension loaded (detr_fast.dispatch loads it and records what it provides).
"""

import torch

from ..dispatch import MISSING

if MISSING["extension"] is None:

    @torch.library.register_fake("detr_fast::linear_assignment")
    def _linear_assignment_fake(cost: torch.Tensor, num_targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """assignment [..., N] int64 and status [...] uint8 for cost [..., N, M] and num_targets [...]."""
        torch._check(
            num_targets.shape == cost.shape[:-2],
            lambda: (
                f"detr_fast::linear_assignment: num_targets has shape {tuple(num_targets.shape)}, expected "
                f"{tuple(cost.shape[:-2])}"
            ),
        )
        return cost.new_empty(cost.shape[:-1], dtype=torch.int64), cost.new_empty(cost.shape[:-2], dtype=torch.uint8)

    @torch.library.register_fake("detr_fast::match_cost_cpu")
    def _match_cost_cpu_fake(
        class_costs, pred_boxes, tgt_labels, tgt_boxes, tgt_mask, class_w, bbox_w, giou_w
    ) -> torch.Tensor:
        """cost [..., B, N, M] for class_costs [..., B, N, K] and tgt_labels [B, M]."""
        return class_costs.new_empty((*class_costs.shape[:-1], tgt_labels.shape[-1]))

    @torch.library.register_fake("detr_fast::leaders_cpu")
    def _leaders_cpu_fake(maps) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """best [P], runner_up [P] (maps' dtype) and winner [P] int64 for maps [K, P]."""
        columns = maps.shape[1]
        return maps.new_empty(columns), maps.new_empty(columns), maps.new_empty(columns, dtype=torch.int64)

    @torch.library.register_fake("detr_fast::bilinear_points_cpu")
    def _bilinear_points_cpu_fake(maps, map_index, y, x, row_index, row_weight, col_index, col_weight) -> torch.Tensor:
        """[P] float32 for map_index [P]."""
        return maps.new_empty(map_index.shape)
