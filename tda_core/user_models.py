"""Your own `nn.Module` made ready for every ensemble: dropout found, LoRA targets named, gradients checked.

- Dropout: plain `nn.Dropout` modules are swapped for `MaskableDropout` (same rate), so Dropout Ensemble
  members can fix one mask each; channel dropout (`nn.Dropout1d/2d/3d`) and alpha dropout have no
  element-wise fixed-mask form and are refused, named. A model without dropout works for every ensemble
  but the dropout ones, which then say so.
- LoRA targets: every `nn.Linear` and `nn.Conv2d` unless you name them.
- Per-sample gradients: one training step of `train_many` and per-sample gradients with `torch.func` on
  two examples are tried at registration; when they fail, the first layer that fails alone is named.
- `model_digest`: what the model is (its class source, its layout and its weights drawn from seed 0), so
  store keys of two different models never meet.
"""
from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from .errors import UserError
from .models.dropout import MaskableDropout

LORA_LAYERS = (nn.Linear, nn.Conv2d)
UNMASKABLE_DROPOUT = (nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


def prepare_model(model: nn.Module, lora_targets: Sequence[str] | None = None) -> nn.Module:
    """Swap `nn.Dropout` for `MaskableDropout` in place and set `dropout_layers` and `lora_targets`."""
    for name, module in list(model.named_modules()):
        if isinstance(module, UNMASKABLE_DROPOUT):
            raise UserError(f"layer {name!r} is {type(module).__name__}: only element-wise nn.Dropout can hold a "
                            "fixed mask per ensemble member; replace it by nn.Dropout or remove it")
        if type(module) is nn.Dropout:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, MaskableDropout(module.p))
    if not hasattr(model, "dropout_layers"):
        model.dropout_layers = tuple(n for n, m in model.named_modules() if isinstance(m, MaskableDropout))
    if lora_targets is not None:
        model.lora_targets = tuple(lora_targets)
    elif not hasattr(model, "lora_targets"):
        model.lora_targets = tuple(n for n, m in model.named_modules() if isinstance(m, LORA_LAYERS))
    names = dict(model.named_modules())
    unknown = [t for t in model.lora_targets if t not in names]
    if unknown:
        raise UserError(f"LoRA targets {', '.join(unknown)} are not modules of the model; its Linear / Conv2d "
                        f"layers are: {', '.join(n for n, m in names.items() if isinstance(m, LORA_LAYERS))}")
    return model


def _source(obj: object) -> str:
    try:
        return inspect.getsource(obj)
    except (OSError, TypeError):  # defined in a REPL or built in: its qualified name stands for it
        return f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', type(obj).__qualname__)}"


def model_digest(model_fn: Callable[[], nn.Module]) -> str:
    """Hash of the model's class source, the builder's source, its layout and its weights from seed 0."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = model_fn()
    h = hashlib.sha256()
    for text in (_source(type(model)), _source(model_fn), repr(model)):
        h.update(text.encode())
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def failing_layer(model: nn.Module, x: torch.Tensor) -> tuple[str, nn.Module, Exception] | None:
    """The first layer with parameters whose per-sample gradients (vmap of grad) fail on its own inputs."""
    calls: list[tuple[str, nn.Module, tuple]] = []
    hooks = [m.register_forward_hook(lambda mod, args, out, n=name: calls.append((n, mod, args)))
             for name, m in model.named_modules() if next(m.parameters(recurse=False), None) is not None]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    for name, module, args in calls:
        params = {k: v.detach() for k, v in module.named_parameters(recurse=False)}

        def total(p, *a, module=module):
            out = functional_call(module, p, tuple(t.unsqueeze(0) if torch.is_tensor(t) else t for t in a))
            return (out[0] if isinstance(out, tuple) else out).sum()

        try:
            vmap(grad(total), in_dims=(None, *(0 if torch.is_tensor(a) else None for a in args)))(params, *args)
        except Exception as exc:  # noqa: BLE001 - any failure names the layer
            return name, module, exc
    return None


def explain_gradient_failure(model: nn.Module, x: torch.Tensor, exc: Exception) -> UserError:
    """A UserError naming the layer that breaks per-sample gradients (or the model's own random calls)."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "randomness" in str(exc):
        return UserError("the model draws random numbers in its forward pass outside nn.Dropout modules (e.g. "
                         f"F.dropout or torch.rand): every random draw must be seeded per member ({first})")
    culprit = failing_layer(model.eval(), x)
    if culprit is not None:
        name, module, err = culprit
        return UserError(f"layer {name!r} ({type(module).__name__}) is not supported: its per-sample gradients "
                         f"with torch.func fail ({str(err).splitlines()[0] if str(err) else type(err).__name__}); "
                         "replace it (e.g. nn.LSTM for nn.GRU) or remove it")
    return UserError(f"per-sample gradients of the model fail with torch.func: {type(exc).__name__}: {first}")
