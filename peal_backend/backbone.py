"""DINOv2 loading and the adapted classifier: linear probe, LoRA (peft) or visual prompt tuning.

The classifier runs DINOv2's blocks itself (embeddings -> [prompts] -> blocks -> layernorm) rather than
calling `Dinov2Model.forward`, so that prompts can be inserted and a forward can start at any block
(the activation cache for LoRA on the last K blocks).
"""
from __future__ import annotations

import copy
import logging
import math
import os
import threading
from pathlib import Path

import torch
from torch import nn

from .config import Settings

log = logging.getLogger(__name__)

# the small backbones shipped in the package (peal_backend/backbones/<name>/), by name
PACKAGED_BACKBONES = {name: Path(__file__).parent / "backbones" / name for name in ("peal-mini", "peal-mini-2", "peal-mini-3", "peal-mini-4")}


class BackboneLoadError(RuntimeError):
    """The backbone could not be loaded; the message says why and how to fix it."""


def resolve_backbone(name: str) -> str:
    """A packaged name (`peal-mini`) becomes its folder; hub ids and paths pass through."""
    if name in PACKAGED_BACKBONES:
        path = PACKAGED_BACKBONES[name]
        if not (path / "config.json").exists():
            raise BackboneLoadError(f"packaged backbone {name!r} is missing its files under {path}; reinstall peal-backend")
        return str(path)
    return name


def backbone_fingerprint(name: str) -> str:
    """What identifies the backbone's weights, for caches of its activations: a hub id as given; for a
    folder (packaged backbones included), its path plus the size and mtime of each weight file, so
    retrained or replaced weights under the same path never reuse stale activations."""
    source = resolve_backbone(name)
    if not os.path.isdir(source):
        return source
    files = sorted(p for p in Path(source).iterdir() if p.suffix in (".safetensors", ".bin", ".json"))
    return source + ";" + ";".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)


_cache: dict[str, nn.Module] = {}
_fingerprints: dict[str, str] = {}  # source -> fingerprint of the weights this process loaded
_cache_lock = threading.Lock()


def loaded_fingerprint(name: str) -> str:
    """The fingerprint of the weights this process serves for `name` (loading them if needed): what
    caches of its activations must be keyed by. Files rewritten under a running process change
    `backbone_fingerprint` but not the weights in memory, so keying on the files would file old-weight
    activations under the new weights' key."""
    load_backbone(name)
    return _fingerprints[resolve_backbone(name)]


def load_backbone(name: str) -> nn.Module:
    """A fresh copy of the pretrained DINOv2 (`Dinov2Model.from_pretrained` on a hub id or folder).

    The pretrained weights are read once per process; each caller gets its own deep copy so that
    adapters injected into one model never leak into another.
    """
    import torch

    source = resolve_backbone(name)
    with _cache_lock:
        # under the lock: transformers resolves its names lazily, and two threads importing it at once
        # (a /setup check and a /predict) made one fail with "cannot import name 'Dinov2Model'"
        from transformers import Dinov2Model

        if source not in _cache:
            before = backbone_fingerprint(name)
            try:
                # float32 whatever the stored dtype (peal-mini is stored in float16 to stay small);
                # training and scoring opt into bf16 autocast where the hardware has it
                model = Dinov2Model.from_pretrained(source, attn_implementation="sdpa", dtype=torch.float32)
            except Exception as exc:  # transformers raises OSError, ValueError, HFValidationError...
                local = os.path.exists(source)
                hint = (f"the folder {source!r} exists but does not hold a DINOv2 model saved with save_pretrained"
                        if local else
                        f"{source!r} is neither a local folder nor a hub id that could be downloaded "
                        "(offline machines: download it elsewhere, copy the folder here and set PEAL_BACKBONE to its path, "
                        "or use PEAL_BACKBONE=peal-mini, the small backbone shipped with peal-backend)")
                raise BackboneLoadError(f"cannot load DINOv2 backbone PEAL_BACKBONE={name!r}: {hint}. Cause: {exc}") from exc
            model.eval()
            with torch.no_grad():
                # from_pretrained leaves float32 weights memory-mapped from model.safetensors: copy them
                # into this process, so that weights rewritten under a running server (a retrained
                # peal-mini, a refreshed snapshot) cannot kill it with SIGBUS at the next load
                for t in [*model.parameters(), *model.buffers()]:
                    t.data = t.data.clone()
            for p in model.parameters():
                p.requires_grad_(False)
            if backbone_fingerprint(name) != before:  # rewritten while being read: which weights we hold is unknown
                raise BackboneLoadError(f"PEAL_BACKBONE={name!r}: its weight files changed while they were being "
                                        "loaded; try again once they are written")
            _cache[source] = model
            _fingerprints[source] = before
        return copy.deepcopy(_cache[source])


def input_size(settings: Settings, config) -> int:
    """Square input size: the setting, or the backbone's own size capped at 224; a multiple of the patch."""
    size = settings.image_size or min(int(config.image_size), 224)
    patch = int(config.patch_size)
    return max(patch, size // patch * patch)


class Classifier(nn.Module):
    """DINOv2 + adapter + linear head. Only adapter, prompt and head parameters are trainable."""

    def __init__(self, backbone: nn.Module, n_classes: int, settings: Settings):
        super().__init__()
        self.adapter = settings.adapter
        self.use_mean = settings.features == "cls+mean"
        cfg = backbone.config
        self.n_layers = cfg.num_hidden_layers
        self.backbone = backbone
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.n_prompts = 0
        self.first_adapted = 0  # index of the first block whose output depends on trainable parameters
        if self.adapter == "lora":
            self._inject_lora(settings)
        elif self.adapter == "prompt":
            self.n_prompts = settings.prompt_tokens
            depth = self.n_layers if settings.prompt_deep else 1
            std = math.sqrt(6.0 / (cfg.hidden_size + cfg.patch_size ** 2 * 3))  # VPT's uniform init scale
            self.prompts = nn.Parameter(torch.empty(depth, self.n_prompts, cfg.hidden_size).uniform_(-std, std))
        elif self.adapter == "linear":
            self.first_adapted = self.n_layers
        self.feature_dim = cfg.hidden_size * (2 if self.use_mean else 1)
        self.head = nn.Linear(self.feature_dim, n_classes)

    def _inject_lora(self, settings: Settings) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        k = settings.lora_last_k
        layers = list(range(self.n_layers - k, self.n_layers)) if 0 < k < self.n_layers else None
        self.first_adapted = layers[0] if layers else 0
        config = LoraConfig(r=settings.lora_rank, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
                            target_modules=lora_targets(self.backbone, settings.lora_target_modules), layers_to_transform=layers,
                            layers_pattern="layer" if layers else None, bias="none")
        inject_adapter_in_model(config, self.backbone)
        n = sum(1 for name, _ in self.backbone.named_parameters() if "lora_" in name)
        if n == 0:
            raise ValueError(f"PEAL_LORA_TARGETS={settings.lora_targets!r} matched no module of the backbone")
        for name, p in self.backbone.named_parameters():
            p.requires_grad_("lora_" in name)

    # --- forward ------------------------------------------------------------------------------------
    def embed(self, pixels: torch.Tensor, until: int = 0) -> torch.Tensor:
        """Token sequence entering block `until` (0 = right after the patch embedding)."""
        hidden = self.backbone.embeddings(pixels)
        if self.n_prompts:
            hidden = torch.cat([hidden[:, :1], self.prompts[0].expand(len(hidden), -1, -1), hidden[:, 1:]], dim=1)
        for i in range(until):
            hidden = self._block(i, hidden)
        return hidden

    def _block(self, i: int, hidden: torch.Tensor) -> torch.Tensor:
        if self.n_prompts and i > 0 and len(self.prompts) > 1:  # deep prompts: fresh tokens at every block
            hidden = torch.cat([hidden[:, :1], self.prompts[i].expand(len(hidden), -1, -1),
                                hidden[:, 1 + self.n_prompts:]], dim=1)
        return self.backbone.encoder.layer[i](hidden)

    def features_from(self, hidden: torch.Tensor, start: int) -> torch.Tensor:
        """Run blocks start..L-1, the final layernorm and pooling: the head's input features."""
        for i in range(start, self.n_layers):
            hidden = self._block(i, hidden)
        hidden = self.backbone.layernorm(hidden)
        cls = hidden[:, 0]
        if not self.use_mean:
            return cls
        patches = hidden[:, 1 + self.n_prompts:]
        return torch.cat([cls, patches.mean(dim=1)], dim=1)

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.features_from(self.embed(pixels), 0)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(pixels))

    # --- parameters -----------------------------------------------------------------------------------
    def trainable_state(self) -> dict[str, torch.Tensor]:
        """What a model version stores: adapter, prompt and head weights (the backbone is pretrained)."""
        keep = {name for name, p in self.named_parameters() if p.requires_grad}
        return {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items() if k in keep}

    def load_trainable(self, state: dict[str, torch.Tensor]) -> None:
        own = self.state_dict()
        unknown = [k for k in state if k not in own]
        if unknown:
            raise ValueError(f"saved weights do not fit this model (adapter or backbone changed?): {unknown[:3]}")
        own.update(state)
        self.load_state_dict(own)

    def parameter_counts(self) -> dict[str, int]:
        total = sum(p.numel() for p in self.parameters())
        backbone = sum(p.numel() for n, p in self.backbone.named_parameters() if "lora_" not in n)
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        head = sum(p.numel() for p in self.head.parameters())
        return {"total": total, "backbone": backbone, "trainable": trainable, "head": head, "adapter": trainable - head}


# transformers 5 renamed DINOv2's attention projections; accept either spelling.
_ALIASES = {"query": "q_proj", "key": "k_proj", "value": "v_proj", "dense": "o_proj"}
_ALIASES.update({v: k for k, v in _ALIASES.items()})


def lora_targets(backbone: nn.Module, names: list[str]) -> list[str]:
    """The requested module names, translated to the spelling this transformers version uses."""
    present = {name.rsplit(".", 1)[-1] for name, _ in backbone.named_modules()}
    out = []
    for name in names:
        if name in present:
            out.append(name)
        elif _ALIASES.get(name) in present:
            out.append(_ALIASES[name])
        else:
            raise ValueError(f"PEAL_LORA_TARGETS: no module named {name!r} in the backbone "
                             f"(linear layers it has: {', '.join(sorted(n for n in present if 'proj' in n or n.startswith('fc')))})")
    return out


def build_classifier(settings: Settings, n_classes: int) -> Classifier:
    torch.manual_seed(settings.seed)
    model = Classifier(load_backbone(settings.backbone), n_classes, settings)
    return model.to(settings.device)
