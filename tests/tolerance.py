"""The tolerance rule of DESIGN.md: a kernel's error against a float64 reference is at most twice the error of
PyTorch doing the same computation in the input dtype, plus a small floor relative to the values' size."""
import torch

FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def tolerance_error(name, got, truth, baseline, dtype):
    """Return None when `got` passes the rule, else a message with the errors and where the worst one is."""
    got, truth, baseline = got.double(), truth.double(), baseline.double()
    finite = torch.isfinite(truth)
    if not torch.equal(torch.isfinite(got), finite) or not torch.equal(got[~finite], truth[~finite]):
        bad = (torch.isfinite(got) != finite).nonzero()
        return f"{name}: non-finite values differ from the reference at {bad[:5].tolist()}"
    err = (got[finite] - truth[finite]).abs().max().item() if finite.any() else 0.0
    base_err = (baseline[finite] - truth[finite]).abs().max().item() if finite.any() else 0.0
    scale = max(truth[finite].abs().max().item() if finite.any() else 0.0, 1.0)
    limit = 2 * base_err + FLOOR[dtype] * scale
    if err <= limit:
        return None
    worst = ((got - truth).abs().nan_to_num(0.0)).argmax()
    index = torch.unravel_index(worst, got.shape)
    return (f"{name}: max error {err:.3g} > limit {limit:.3g} (2 x PyTorch-in-{dtype} error {base_err:.3g} + floor); "
            f"worst at {tuple(i.item() for i in index)}: got {got[index].item():.6g}, want {truth[index].item():.6g}")


def assert_within_tolerance(name, got, truth, baseline, dtype):
    message = tolerance_error(name, got, truth, baseline, dtype)
    assert message is None, message
