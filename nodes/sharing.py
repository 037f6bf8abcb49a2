"""Sharing a host's already-loaded LTX-2 model with ours (plain torch, no ComfyUI import), so
ComfyUI's offloading, casting and LoRA patches apply to the weights we run and nothing is copied."""
from __future__ import annotations

from torch import nn


def adopt_modules(ours: nn.Module, theirs: nn.Module) -> list[str]:
    """Make `ours` use the weight-holding submodules and parameters of `theirs` (same LTX-2 names),
    so a host's already-loaded model (with its offloading, casting and LoRA patches) is shared,
    not copied. Only modules that own parameters directly are taken. Returns the adopted names."""
    taken = []
    their_mods = dict(theirs.named_modules())
    for name, mod in list(ours.named_modules()):
        direct = dict(mod.named_parameters(recurse=False))
        if not name or not direct:
            continue
        if name not in their_mods:
            raise KeyError(f"the host model has no module '{name}'")
        other = their_mods[name]
        if isinstance(mod, (nn.Linear, nn.RMSNorm)):
            for pn, p in direct.items():
                op = getattr(other, pn, None)
                if op is not None and tuple(op.shape) != tuple(p.shape):
                    raise ValueError(f"'{name}.{pn}': host shape {tuple(op.shape)} != {tuple(p.shape)}")
            parent_name, _, leaf = name.rpartition(".")
            parent = ours.get_submodule(parent_name) if parent_name else ours
            if isinstance(parent, nn.ModuleList):
                parent[int(leaf)] = other
            else:
                setattr(parent, leaf, other)
            taken.append(name)
        else:  # raw tables (scale_shift_table, sinks, registers): share the Parameter objects
            for pn, p in direct.items():
                op = getattr(other, pn)
                if tuple(op.shape) != tuple(p.shape):
                    raise ValueError(f"'{name}.{pn}': host shape {tuple(op.shape)} != {tuple(p.shape)}")
                setattr(mod, pn, op)
            taken.append(name)
    # top-level raw parameters (scale_shift_table, audio_scale_shift_table, audio_sink_tokens)
    for pn, p in list(ours.named_parameters(recurse=False)):
        op = getattr(theirs, pn)
        if tuple(op.shape) != tuple(p.shape):
            raise ValueError(f"'{pn}': host shape {tuple(op.shape)} != {tuple(p.shape)}")
        setattr(ours, pn, op)
        taken.append(pn)
    return taken
