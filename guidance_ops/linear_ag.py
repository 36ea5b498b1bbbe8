"""LinearAG (Castillo et al., AAAI 2025, arXiv 2312.12487, with Adaptive Guidance): early in sampling the
unconditional prediction is well predicted by an affine combination of estimates the trajectory already has, so
every other step replaces the unconditional pass by that regression and runs the conditional pass alone.

Our statement (the paper gives the idea and its least-squares fit on sampled trajectories; the exact features are
ours): on a regressed step i, with the previous step's conditional and unconditional predictions (real: steps
alternate), D_u(i) ~ b0 D_c(i) + b1 D_c(i-1) + g1 D_u(i-1), the three scalars fitted per step by least squares
over every element of the calibration runs. Denoised (x0) predictions are used, as everywhere ComfyUI guides.
A calibration holds the coefficients per regressed step, for one step count.
"""
import json

import torch

FORMAT, VERSION = "trainfree-linear-ag", 1


class CalibrationError(ValueError):
    """A calibration that cannot be used; the message names the fix."""


def regressed_steps(steps):
    """The steps whose unconditional pass is regressed: every other one, from the second (step 1, 3, ...)."""
    return list(range(1, steps, 2))


def fit(targets, features):
    """Least squares: scalars c minimising || sum_k c_k features[k] - targets ||^2 over all elements.
    ``targets``: tensors of the unconditional predictions; ``features``: per target, its feature tensors."""
    rows = torch.cat([torch.stack([f.double().flatten() for f in fs], 1) for fs in features])
    y = torch.cat([t.double().flatten() for t in targets])
    gram = rows.T @ rows
    coefficients = torch.linalg.solve(gram + 1e-12 * torch.eye(len(gram), dtype=gram.dtype), rows.T @ y)
    return [float(c) for c in coefficients]


def features_of(cond, previous_cond, previous_uncond):
    return [cond, previous_cond, previous_uncond]


def predict(coefficients, cond, previous_cond, previous_uncond):
    b0, b1, g1 = coefficients
    return b0 * cond + b1 * previous_cond + g1 * previous_uncond


def calibrate(trajectories):
    """``trajectories``: runs, each a list per step of (D_c, D_u). Returns {step: coefficients} for the
    regressed steps."""
    steps = len(trajectories[0])
    if any(len(t) != steps for t in trajectories):
        raise CalibrationError("the calibration runs took different step counts: use one sampler and scheduler")
    out = {}
    for i in regressed_steps(steps):
        targets = [t[i][1] for t in trajectories]
        feats = [features_of(t[i][0], t[i - 1][0], t[i - 1][1]) for t in trajectories]
        out[i] = fit(targets, feats)
    return out


def relative_error(coefficients, trajectories):
    """Per regressed step, the regression's squared error over the unconditional prediction's energy."""
    out = {}
    for i, c in coefficients.items():
        err = sum(float(((predict(c, t[i][0], t[i - 1][0], t[i - 1][1]) - t[i][1]) ** 2).sum()) for t in trajectories)
        energy = sum(float((t[i][1] ** 2).sum()) for t in trajectories)
        out[i] = err / max(energy, 1e-30)
    return out


def dump(steps, coefficients, meta):
    return json.dumps({"format": FORMAT, "version": VERSION, "steps": steps,
                       "coefficients": {str(k): v for k, v in sorted(coefficients.items())}, "meta": meta},
                      indent=2) + "\n"


def load(text):
    """(steps, {step: coefficients}, meta) from a calibration file's text; CalibrationError names the fix."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise CalibrationError(f"not valid JSON: {error.msg} at line {error.lineno}, column {error.colno}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("version") != VERSION:
        raise CalibrationError(f"not a LinearAG calibration (format '{FORMAT}', version {VERSION}): make one with "
                               f"TrainFree LinearAG Calibrate")
    steps, raw = data.get("steps"), data.get("coefficients")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2 or not isinstance(raw, dict):
        raise CalibrationError("a calibration needs 'steps' (an integer >= 2) and 'coefficients': make it again "
                               "with TrainFree LinearAG Calibrate")
    coefficients = {}
    for key, value in raw.items():
        if not key.isdigit() or not 1 <= int(key) < steps or not isinstance(value, list) or len(value) != 3 \
                or not all(isinstance(v, (int, float)) for v in value):
            raise CalibrationError(f"coefficients of step {key!r} are malformed (three numbers per step 1..{steps - 1})"
                                   f": make the calibration again")
        coefficients[int(key)] = [float(v) for v in value]
    return steps, coefficients, data.get("meta", {})
