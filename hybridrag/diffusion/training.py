"""The optimisation loop the diffusion models' training functions share."""
import math

import torch

from .._optional import import_optional

DEFAULT_LR = 1e-3


def make_optimizer(model, optimizer, lr, weight_decay):
    """`optimizer` itself, or None: a new AdamW(lr (default DEFAULT_LR), weight_decay (default 0)). lr and
    weight_decay configure that new one only: with an optimizer to continue with they are a ValueError (they would
    be silently unused; set them on the optimizer)."""
    if optimizer is not None:
        if lr is not None or weight_decay is not None:
            raise ValueError("lr and weight_decay configure the AdamW made when optimizer is None; with optimizer= "
                             "given they would be unused: set them on that optimizer instead")
        return optimizer
    return torch.optim.AdamW(model.parameters(), lr=DEFAULT_LR if lr is None else lr,
                             weight_decay=0.0 if weight_decay is None else weight_decay)


def run_steps(model, optimizer, loss_of_rows, *, rows, steps, batch_size, seed, description, progress):
    """`steps` optimizer steps of `loss_of_rows(index (batch_size,) int64, generator)` on batches of `batch_size`
    row indices drawn at random (with replacement) out of `rows`, with one seeded generator for the draws and the
    loss's own noise. Returns the loss history (list of `steps` floats). A loss that is not finite stops training
    with FloatingPointError naming the step. The model trains in train mode and is left in eval mode."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    bar = None
    if progress:
        tqdm = import_optional("tqdm", "tqdm>=4", "retrieval").tqdm
        bar = tqdm(total=steps, desc=description, unit="step")
    history = []
    model.train()
    try:
        for step in range(steps):
            index = torch.randint(0, rows, (batch_size,), device=device, generator=generator)
            loss = loss_of_rows(index, generator)
            value = loss.item()
            if not math.isfinite(value):
                raise FloatingPointError(f"the loss of step {step} is {value}; training stopped")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            history.append(value)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{value:.4f}", refresh=False)
    finally:
        if bar is not None:
            bar.close()
        model.eval()
    return history
