"""Folding frozen batch-norm layers into the convolutions that feed them (inference speed).

In eval mode a BatchNorm2d is an affine map per channel, so conv -> BN equals one conv with
rescaled weights and a bias. Which BN follows which conv is found by running one small forward
pass and matching tensors, so it works for every backbone without per-architecture code.
"""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def fold_batch_norms(model: nn.Module, example: torch.Tensor) -> int:
    """Fold every BatchNorm2d whose input is exactly a Conv2d's output; returns how many were folded."""
    produced_by: dict[int, nn.Conv2d] = {}
    pairs: list[tuple[nn.Conv2d, nn.BatchNorm2d]] = []
    keep_alive: list[torch.Tensor] = []

    def after_conv(module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        produced_by[id(output)] = module  # type: ignore[assignment]
        keep_alive.append(output)

    def before_bn(module: nn.Module, inputs: tuple) -> None:
        conv = produced_by.get(id(inputs[0]))
        if conv is not None:
            pairs.append((conv, module))  # type: ignore[arg-type]

    hooks = []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            hooks.append(module.register_forward_hook(after_conv))
        elif isinstance(module, nn.BatchNorm2d):
            hooks.append(module.register_forward_pre_hook(before_bn))
    was_training = model.training
    model.eval()
    try:
        model(example)
    finally:
        for hook in hooks:
            hook.remove()
    uses: dict[int, int] = {}
    for conv, _ in pairs:
        uses[id(conv)] = uses.get(id(conv), 0) + 1
    folded = 0
    parents = {id(child): (parent, name) for parent in model.modules() for name, child in parent.named_children()}
    for conv, bn in pairs:
        if uses[id(conv)] != 1 or id(bn) not in parents:
            continue  # a conv shared by several BNs cannot absorb one of them
        running_mean, running_var = bn.running_mean, bn.running_var
        if running_mean is None or running_var is None:
            continue  # without running statistics a BN normalises by batch statistics, not affinely
        scale = bn.weight / torch.sqrt(running_var + bn.eps)
        conv.weight.mul_(scale.view(-1, 1, 1, 1))
        bias = conv.bias if conv.bias is not None else torch.zeros_like(running_mean)
        conv.bias = nn.Parameter((bias - running_mean) * scale + bn.bias, requires_grad=False)
        parent, name = parents[id(bn)]
        setattr(parent, name, nn.Identity())
        folded += 1
    model.train(was_training)
    return folded
