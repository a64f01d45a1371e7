#!/usr/bin/env python
"""Pretrain `peal-mini`: a small DINOv2-architecture ViT, self-supervised, on an offline corpus.

Method (as DINOv2 is trained, scaled down for a 2-core CPU): DINO self-distillation (student and EMA
teacher, centering + sharpening, multi-crop with 2 global and several local crops) plus iBOT's masked
patch loss (the student sees masked global crops, the teacher the full ones). The teacher backbone is
saved with `save_pretrained` (safetensors) together with PROVENANCE.json.

Corpus, all offline and real (never test images):
  * Fashion-MNIST train images (Debian `dataset-fashion-mnist`)
  * random crops of the photographs and artwork in Debian wallpaper packages
    (`plasma-workspace-wallpapers`, `gnome-backgrounds`, `mate-backgrounds`)
  * the unlabeled TRAIN pools of /work/shared/datasets/{retinamnist,pneumoniamnist}.npz

    python scripts/pretrain_peal_mini.py --install-packages          # the full run (~20-40 min on a shared 2-core CPU)
    python scripts/pretrain_peal_mini.py --steps 30 --out /tmp/smoke  # a smoke run
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from peal_backend import images as images_module  # noqa: E402
from peal_backend.backbones import image_stats  # noqa: E402
DEBIAN_PACKAGES = ("dataset-fashion-mnist", "plasma-workspace-wallpapers", "gnome-backgrounds", "mate-backgrounds")
FMNIST_FILE = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
WALLPAPER_DIRS = (Path("/usr/share/wallpapers"), Path("/usr/share/backgrounds"))
SHARED = Path(os.environ.get("PEAL_DATASETS") or Path(__file__).resolve().parents[2] / "shared" / "datasets")
DOMAIN_SETS = ("retinamnist", "pneumoniamnist")
IMAGENET_MEAN = torch.tensor(images_module.IMAGENET_MEAN).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor(images_module.IMAGENET_STD).view(1, 3, 1, 1)


# ----------------------------------------------------------------------------------------- corpus
def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def install_packages() -> None:
    """apt-get install the Debian packages that hold the corpus (needs root)."""
    missing = [p for p in DEBIAN_PACKAGES
               if subprocess.run(["dpkg", "-s", p], capture_output=True).returncode != 0]
    if not missing:
        return
    print("installing", missing, flush=True)
    subprocess.run(["apt-get", "update"], check=True)
    subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *missing], check=True,
                   env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


def package_versions() -> dict:
    out = {}
    for p in DEBIAN_PACKAGES:
        r = subprocess.run(["dpkg-query", "-W", "-f=${Version}", p], capture_output=True, text=True)
        out[p] = r.stdout.strip() if r.returncode == 0 else None
    return out


def load_fmnist(path: Path = FMNIST_FILE) -> np.ndarray:
    """Fashion-MNIST train images, (60000, 28, 28) uint8, from the IDX file."""
    if not path.exists():
        sys.exit(f"missing {path}: install the Debian package dataset-fashion-mnist "
                 "(or run with --install-packages)")
    with gzip.open(path, "rb") as f:
        data = f.read()
    n, rows, cols = (int.from_bytes(data[i:i + 4], "big") for i in (4, 8, 12))
    return np.frombuffer(data, np.uint8, offset=16).reshape(n, rows, cols)


def wallpaper_files() -> list[Path]:
    """Raster wallpapers; for multi-resolution KDE wallpapers keep only the largest file per folder."""
    files = []
    for root in WALLPAPER_DIRS:
        if root.exists():
            files += [p for p in root.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp")
                      and not p.name.startswith("screenshot")]
    best: dict[Path, Path] = {}
    for p in sorted(files):
        key = p.parent if "contents" in p.parts else p
        if key not in best or p.stat().st_size > best[key].stat().st_size:
            best[key] = p
    return sorted(best.values())


def wallpaper_crops(files: list[Path], per_image: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Random square crops (5%-50% of the short side) of each wallpaper, resized to size x size RGB."""
    from PIL import Image

    crops = []
    for path in files:
        try:
            img = Image.open(path)
            img.draft("RGB", (1600, 1600))  # JPEG: decode at reduced scale, much faster
            img = img.convert("RGB")
        except Exception as exc:  # an unreadable file is skipped, not fatal
            print(f"skip {path}: {exc}", flush=True)
            continue
        if max(img.size) > 1600:
            img.thumbnail((1600, 1600))
        w, h = img.size
        for _ in range(per_image):
            side = int(min(w, h) * rng.uniform(0.05, 0.5))
            side = max(side, size)
            x, y = rng.integers(0, w - side + 1), rng.integers(0, h - side + 1)
            crop = img.crop((x, y, x + side, y + side)).resize((size, size), Image.Resampling.BOX)
            crops.append(np.asarray(crop))
    return np.stack(crops) if crops else np.zeros((0, size, size, 3), np.uint8)


def to_rgb(images: np.ndarray) -> np.ndarray:
    return np.repeat(images[..., None], 3, axis=-1) if images.ndim == 3 else images


def build_corpus(args, rng: np.random.Generator) -> tuple[dict[str, np.ndarray], dict]:
    """Each source as a (N, 28, 28, 3) uint8 array, and a record of where it came from."""
    sources, record = {}, {}  # a source with sampling weight 0 is not loaded (nor needed on the machine)
    if args.w_fmnist > 0:
        sources["fashion_mnist"] = to_rgb(load_fmnist())
        record["fashion_mnist"] = {"file": str(FMNIST_FILE), "sha256": sha256(FMNIST_FILE),
                                   "images": len(sources["fashion_mnist"])}
    if args.w_wallpapers > 0:
        files = wallpaper_files()
        if not files:
            sys.exit("no wallpapers found: install " + " ".join(DEBIAN_PACKAGES[1:]) + " (or run with --install-packages)")
        sources["wallpapers"] = wallpaper_crops(files, args.crops_per_wallpaper, args.image_size, rng)
        listing = "\n".join(f"{p} {sha256(p)}" for p in files)
        record["wallpapers"] = {"files": len(files), "crops": len(sources["wallpapers"]),
                                "listing_sha256": hashlib.sha256(listing.encode()).hexdigest()}
    for name in DOMAIN_SETS:
        path = SHARED / f"{name}.npz"
        with np.load(path) as d:
            sources[name] = to_rgb(d["train_images"])  # the unlabeled TRAIN pool only, never test
        record[name] = {"file": str(path), "sha256": sha256(path), "split": "train_images",
                        "images": len(sources[name])}
    for name, arr in sources.items():
        if arr.shape[1:] != (args.image_size, args.image_size, 3):
            raise ValueError(f"{name}: images are {arr.shape[1:]}, expected {args.image_size}px RGB")
    return sources, record


# ---------------------------------------------------------------------------------- augmentation
def random_resized_crop(x: torch.Tensor, out: int, scale: tuple[float, float], g: torch.Generator) -> torch.Tensor:
    """Batched RandomResizedCrop + horizontal flip with one affine grid per image."""
    n = x.shape[0]
    area = torch.empty(n).uniform_(*scale, generator=g)
    log_r = torch.empty(n).uniform_(math.log(3 / 4), math.log(4 / 3), generator=g)
    w = torch.sqrt(area * log_r.exp()).clamp(max=1.0)
    h = torch.sqrt(area / log_r.exp()).clamp(max=1.0)
    cx = (torch.rand(n, generator=g) * 2 - 1) * (1 - w)
    cy = (torch.rand(n, generator=g) * 2 - 1) * (1 - h)
    flip = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w * flip, cx, h, cy
    grid = F.affine_grid(theta, (n, 3, out, out), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def color_augment(x: torch.Tensor, g: torch.Generator, blur_p: float, solarize_p: float,
                  jitter: float = 0.2, keep_colour: bool = False) -> torch.Tensor:
    """Colour jitter (p=0.8, factors 1 ± jitter), grayscale (p=0.2), blur, solarisation; x in [0, 1].

    keep_colour: no saturation jitter and no grayscale, so that hue and saturation (the signal in fundus
    photographs) are not something the features learn to ignore. The same random numbers are drawn."""
    n = x.shape[0]

    def per(p):  # a (n,1,1,1) mask: which images get this transform
        return (torch.rand(n, generator=g) < p).float().view(n, 1, 1, 1)

    def factor(lo, hi):
        return torch.empty(n, 1, 1, 1).uniform_(lo, hi, generator=g)

    # mild (or no) brightness/contrast: in X-rays and fundus photos intensity is part of the signal
    jit = per(0.8)
    lo, hi = 1 - jitter, 1 + jitter
    x = x + jit * (x * factor(lo, hi) - x)  # brightness
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = x + jit * ((x - mean) * factor(lo, hi) + mean - x)  # contrast
    gray = x.mean(dim=1, keepdim=True)
    saturation = factor(lo, hi)
    if not keep_colour:
        x = x + jit * ((x - gray) * saturation + gray - x)
    x = x.clamp(0, 1)
    gm = per(0.2) * (not keep_colour)
    x = x + gm * (x.mean(dim=1, keepdim=True).expand_as(x) - x)
    kernel = torch.tensor([1.0, 2.0, 1.0])
    kernel = (kernel[:, None] * kernel[None, :] / 16).view(1, 1, 3, 3).repeat(3, 1, 1, 1)
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), kernel, groups=3)
    x = x + per(blur_p) * factor(0.3, 1.0) * (blurred - x)
    sol = per(solarize_p)
    x = x + sol * (torch.where(x > 0.5, 1 - x, x) - x)
    return x


def normalise(x: torch.Tensor) -> torch.Tensor:
    return (x - IMAGENET_MEAN) / IMAGENET_STD


def multi_crop(batch_u8: torch.Tensor, args, g: torch.Generator) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Two global views (image_size) and args.local_crops local views (args.local_size)."""
    x = batch_u8.permute(0, 3, 1, 2).float() / 255.0
    glob = [normalise(color_augment(random_resized_crop(x, args.image_size, (0.3, 1.0), g), g, blur_p, sol_p,
                                    args.jitter, args.keep_colour))
            for blur_p, sol_p in ((0.8, 0.0), (0.1, 0.2))]
    local = [normalise(color_augment(random_resized_crop(x, args.local_size, (args.local_scale_min, 0.4), g), g,
                                     0.5, 0.0, args.jitter, args.keep_colour))
             for _ in range(args.local_crops)]
    return glob, local


# ------------------------------------------------------------------------------------------ model
class ProjectionHead(nn.Module):
    """DINO head: 3-layer MLP, L2-normalised bottleneck, weight-normalised prototypes."""

    def __init__(self, dim: int, out: int, hidden: int = 512, bottleneck: int = 128):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, bottleneck))
        self.last = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck, out, bias=False))
        self.last.parametrizations.weight.original0.data.fill_(1.0)
        self.last.parametrizations.weight.original0.requires_grad = False

    def forward(self, x):
        return self.last(F.normalize(self.mlp(x), dim=-1))


class Network(nn.Module):
    def __init__(self, backbone, out_dim: int, pixel: bool = False, stats: bool = False):
        super().__init__()
        dim, patch = backbone.config.hidden_size, backbone.config.patch_size
        self.backbone = backbone
        self.cls_head = ProjectionHead(dim, out_dim)
        self.patch_head = ProjectionHead(dim, out_dim)
        # masked pixel prediction (SimMIM-style): a patch token -> the raw normalised pixels under it.
        # Only built when used, so runs without it draw the same random numbers as before it existed.
        self.pixel_head = (nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, patch * patch * 3))
                           if pixel else None)
        # global intensity statistics (--stats-weight): the CLS token -> the view's image_stats, linearly
        self.stats_head = nn.Linear(dim, STATS_DIM) if stats else None

    bf16 = False  # set by train(): forward under bfloat16 autocast (AVX512-BF16 CPUs, GPUs), outputs in float32

    @property
    def device_type(self) -> str:
        return next(self.parameters()).device.type

    def forward(self, x, mask=None):
        """(CLS prototype logits, CLS token, patch tokens), float32."""
        with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.bf16):
            h = self.backbone(pixel_values=x, bool_masked_pos=mask).last_hidden_state
            logits = self.cls_head(h[:, 0])
        return logits.float(), h[:, 0].float(), h[:, 1:].float()

    def head(self, head: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """A projection or pixel head applied under the same autocast as the backbone."""
        with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.bf16):
            return head(x).float()


def patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """(n, c, H, W) -> (n, patches, patch*patch*c), patches in row-major order as the ViT embeds them."""
    n, c, h, w = x.shape
    x = x.reshape(n, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(n, (h // patch) * (w // patch), patch * patch * c)


def save_backbone(backbone, out: Path, dtype: str = "float16") -> None:
    """save_pretrained an inference copy (no drop-path), stored in `dtype` (float16 halves the size;
    the backend loads it back in float32)."""
    import copy

    model = copy.deepcopy(backbone).to("cpu", getattr(torch, dtype))
    model.config.drop_path_rate = 0.0
    model.save_pretrained(out, safe_serialization=True)


def make_config(args):
    from transformers import Dinov2Config

    return Dinov2Config(hidden_size=args.hidden, num_hidden_layers=args.depth, num_attention_heads=args.heads,
                        intermediate_size=4 * args.hidden, patch_size=args.patch, image_size=args.image_size,
                        num_channels=3, drop_path_rate=args.drop_path, layerscale_value=1.0)


def random_masks(n: int, num_patches: int, g: torch.Generator, prob: float = 0.5) -> torch.Tensor:
    """iBOT masking: a share `prob` of the images get 10-50% of their patches masked, the others none."""
    ratio = torch.empty(n).uniform_(0.1, 0.5, generator=g) * (torch.rand(n, generator=g) < prob)
    scores = torch.rand(n, num_patches, generator=g)
    k = (ratio * num_patches).round().long()
    ranks = scores.argsort(dim=1).argsort(dim=1)
    return ranks < k[:, None]


# --------------------------------------------------------------------------------------- losses
def dino_loss(student: list[torch.Tensor], t_probs: list[torch.Tensor], s_temp) -> torch.Tensor:
    """Cross-entropy between the teacher's target distributions (global views) and every other student view."""
    total, pairs = 0.0, 0
    for ti, tp in enumerate(t_probs):
        for si, s in enumerate(student):
            if si == ti:
                continue
            total = total + torch.sum(-tp * F.log_softmax(s / s_temp, dim=-1), dim=-1).mean()
            pairs += 1
    return total / pairs


def ibot_loss(student_patch, tp, s_temp) -> torch.Tensor:
    """Cross-entropy on the masked patches (rows: masked tokens of all images; tp: teacher targets)."""
    if student_patch.shape[0] == 0:
        return student_patch.sum()
    return torch.sum(-tp * F.log_softmax(student_patch / s_temp, dim=-1), dim=-1).mean()


def pixel_loss(net: "Network", patch_tokens: torch.Tensor, view: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked pixel prediction: MSE between the pixel head on the masked tokens and the pixels under them."""
    return F.mse_loss(net.head(net.pixel_head, patch_tokens[mask]), patchify(view, net.backbone.config.patch_size)[mask])


STATS_DIM = 9  # image_stats: 3 channels x (mean, std, central mean)


def stats_loss(net: "Network", cls: torch.Tensor, view: torch.Tensor) -> torch.Tensor:
    """MSE between a linear read-out of the CLS token and the view's global intensity statistics: the CLS
    must keep them linearly, where the invariance the contrastive loss asks for would wash them out."""
    return F.mse_loss(net.head(net.stats_head, cls), image_stats(view))


def info_nce(a: torch.Tensor, b: torch.Tensor, temp: float) -> torch.Tensor:
    """SimCLR's NT-Xent: each view must pick its partner among the other 2n - 1 views (rows L2-normalised)."""
    z = torch.cat([a, b])
    sim = z @ z.t() / temp
    sim = sim.masked_fill(torch.eye(len(z), dtype=torch.bool, device=z.device), float("-inf"))
    n = len(a)
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(sim, partner)


def sinkhorn_knopp(logits: torch.Tensor, temp: float, iters: int = 3) -> torch.Tensor:
    """Teacher targets with equipartition over the batch (DINOv2's centering): rows sum to 1."""
    q = torch.exp((logits - logits.max()) / temp).t()  # prototypes x samples
    q = q / q.sum()
    k, b = q.shape
    for _ in range(iters):
        q = q / q.sum(dim=1, keepdim=True) / k
        q = q / q.sum(dim=0, keepdim=True) / b
    return (q * b).t()


def koleo_loss(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Kozachenko-Leonenko entropy regulariser (DINOv2): push each feature away from its nearest neighbour."""
    x = F.normalize(x, dim=-1)
    d = torch.cdist(x, x)
    d = d + torch.eye(len(x), device=x.device) * 1e4
    return -torch.log(d.min(dim=1).values + eps).mean()


def cosine(step: int, total: int, start: float, end: float, warmup: int = 0) -> float:
    """Cosine from start to end over the steps after warmup."""
    t = max(step - warmup, 0) / max(total - warmup, 1)
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * t))


# ------------------------------------------------------------------------------------- training
STATE_FILE = "training_state.pt"
# arguments a resumed run may change: where it writes, how often it logs and saves, what it runs on
RESUMABLE_CHANGES = {"out", "resume", "checkpoint_dir", "checkpoint_every", "log_every", "threads", "install_packages",
                     "save_dtype", "device", "stop_at"}


def save_state(path: Path, state: dict) -> None:
    """Everything a run needs to go on (both networks, optimiser, centres, every RNG), written atomically:
    a run killed while saving leaves the previous state whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def latest_state(path: Path) -> Path:
    """--resume takes the state file itself or the checkpoint folder holding it."""
    state = path / STATE_FILE if path.is_dir() else path
    if not state.is_file():
        sys.exit(f"--resume {path}: no {STATE_FILE} there (checkpoints write it every --checkpoint-every steps)")
    return state


def check_resumable(saved: dict, now: dict) -> None:
    """A resumed run must be the same run: refuse if a training argument changed (the schedule depends on them).
    Only --steps may grow, to train longer: the cosine schedules are then recomputed for the new length from
    the step reached, a warm restart (the learning rate rises again from where the longer schedule has it)."""
    if now["steps"] < saved["steps"]:
        sys.exit(f"--resume: --steps {now['steps']} is below the saved run's {saved['steps']}")
    saved = {**saved, "steps": now["steps"]}
    # an argument the saved run did not have yet was added later: its default keeps the old behaviour
    changed = {k: (saved[k], v) for k, v in now.items() if k not in RESUMABLE_CHANGES and k in saved and saved[k] != v}
    if changed:
        sys.exit("--resume: these arguments differ from the saved run's (saved, now): "
                 + ", ".join(f"{k}={a!r}/{b!r}" for k, (a, b) in sorted(changed.items())))


def sample_batch(sources: dict[str, np.ndarray], weights: dict[str, float], n: int,
                 rng: np.random.Generator) -> torch.Tensor:
    names = list(weights)
    p = np.array([weights[k] for k in names], float)
    counts = rng.multinomial(n, p / p.sum())
    parts = [sources[k][rng.integers(0, len(sources[k]), c)] for k, c in zip(names, counts) if c]
    return torch.from_numpy(np.concatenate(parts))


def train(args) -> None:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    t_start = time.time()
    sources, corpus = build_corpus(args, rng)
    print("corpus:", {k: len(v) for k, v in sources.items()}, f"({time.time() - t_start:.0f}s)", flush=True)
    weights = {name: w for name, w in (("fashion_mnist", args.w_fmnist), ("wallpapers", args.w_wallpapers),
                                       ("retinamnist", args.w_domain / 2), ("pneumoniamnist", args.w_domain / 2))
               if w > 0}

    from transformers import Dinov2Model

    config = make_config(args)
    use_pixel = args.objective == "pixel" or args.pixel_weight > 0
    use_stats = args.stats_weight > 0
    student = Network(Dinov2Model(config), args.out_dim, pixel=use_pixel, stats=use_stats)
    init = {}
    if args.init_from:  # continue from an earlier stage's backbone (e.g. masked pixel prediction first)
        start = Dinov2Model.from_pretrained(args.init_from, dtype=torch.float32)
        student.backbone.load_state_dict(start.state_dict())
        init_file = next(Path(args.init_from).glob("*.safetensors"))
        init = {"path": args.init_from, "sha256": sha256(init_file)}
        stage = Path(args.init_from) / "PROVENANCE.json"
        if stage.exists():
            init["provenance"] = json.loads(stage.read_text())
    device = torch.device(args.device)
    student.to(device)
    teacher = Network(Dinov2Model(config), args.out_dim, pixel=use_pixel, stats=use_stats).to(device)
    teacher.load_state_dict(student.state_dict())
    teacher.eval()  # no drop-path in the teacher
    for p in teacher.parameters():
        p.requires_grad = False
    final = teacher if args.objective == "dino" else student  # the network whose backbone is saved
    n_params = sum(p.numel() for p in student.backbone.parameters())
    print(f"backbone parameters: {n_params:,}", flush=True)

    params = [p for p in student.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)
    center = torch.zeros(1, args.out_dim, device=device)
    patch_center = torch.zeros(1, args.out_dim, device=device)
    num_patches = (args.image_size // args.patch) ** 2
    warmup = max(1, int(args.warmup_frac * args.steps))
    command = "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:])
    log, t_train, first = [], time.time(), 0
    sitting = {"command": command, "threads": args.threads, "device": args.device}  # this one; from_step below
    sittings = [{**sitting, "from_step": 0}]
    student.bf16 = teacher.bf16 = args.bf16
    if args.resume:
        state_file = latest_state(Path(args.resume))
        state = torch.load(state_file, weights_only=False, map_location=device)
        check_resumable(state["args"], vars(args))
        student.load_state_dict(state["student"])
        teacher.load_state_dict(state["teacher"])
        opt.load_state_dict(state["opt"])
        center.copy_(state["center"])
        patch_center.copy_(state["patch_center"])
        rng.bit_generator.state = state["numpy_rng"]
        g.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"].cpu())
        if device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"].cpu(), device)
        log, first = state["loss_log"], state["step"] + 1
        sittings = state.get("sittings", []) + [{**sitting, "from_step": first}]
        t_train -= state["elapsed_s"]
        print(f"resumed from {state_file} at step {first}", flush=True)
    for step in range(first, args.steps):
        lr = args.lr * (step + 1) / warmup if step < warmup else cosine(step, args.steps, args.lr, args.min_lr, warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        momentum = cosine(step, args.steps, args.ema, 1.0)
        t_temp = args.teacher_temp if step >= warmup else 0.04 + (args.teacher_temp - 0.04) * step / warmup
        batch = sample_batch(sources, weights, args.batch_size, rng)
        glob, local = multi_crop(batch, args, g)  # augmentations run on the CPU, with the CPU generator
        masks = [random_masks(args.batch_size, num_patches, g, args.mask_prob).to(device) for _ in glob]
        glob, local = [v.to(device) for v in glob], [v.to(device) for v in local]
        if args.objective == "pixel":
            # masked image modelling alone (SimMIM): one masked global view, raw pixel targets, no teacher
            view = glob[0]
            m = (torch.rand(args.batch_size, num_patches, generator=g).argsort(1).argsort(1)
                 < int(args.mask_ratio * num_patches)).to(device)
            out = student(view, m)
            loss_pixel = pixel_loss(student, out[2], view, m)
            loss_koleo = koleo_loss(out[1])
            loss = loss_pixel + args.koleo_weight * loss_koleo
            loss_dino = loss_ibot = torch.zeros((), device=device)
            t_cls_p = [torch.full((1, args.out_dim), 1.0 / args.out_dim, device=device)]
        elif args.objective == "contrastive":
            # SimCLR's InfoNCE between the two global views' CLS embeddings (no teacher, no prototypes), plus
            # masked pixel prediction on the masked views when --pixel-weight > 0
            outs = [student(v, m if use_pixel else None) for v, m in zip(glob, masks)]
            z = [F.normalize(student.head(student.cls_head.mlp, o[1]), dim=-1) for o in outs]
            loss_dino = info_nce(z[0], z[1], args.contrastive_temp)  # logged in the "dino" column
            loss_koleo = sum(koleo_loss(o[1]) for o in outs) / len(outs)
            loss_pixel = (sum(pixel_loss(student, o[2], v, m) for o, v, m in zip(outs, glob, masks) if m.any())
                          / len(glob) if use_pixel else torch.zeros((), device=device))
            loss = loss_dino + args.koleo_weight * loss_koleo + args.pixel_weight * loss_pixel
            if use_stats:  # from the CLS of each view, masked or not, to that view's statistics
                loss_stats = sum(stats_loss(student, o[1], v) for o, v in zip(outs, glob)) / len(glob)
                loss = loss + args.stats_weight * loss_stats
            loss_ibot = torch.zeros((), device=device)
            t_cls_p = [F.softmax(z[0] @ z[1].t() / args.contrastive_temp, dim=-1).detach()]
        else:
            with torch.no_grad():
                t_out = [teacher(v) for v in glob]
                t_cls = [o[0] for o in t_out]
                # the patch heads only see masked tokens: the loss ignores the others
                t_patch = [teacher.head(teacher.patch_head, o[2][m]) for o, m in zip(t_out, masks)]
                if args.centering == "sinkhorn":
                    t_cls_p = [sinkhorn_knopp(t, t_temp) for t in t_cls]
                    t_patch_p = [sinkhorn_knopp(t, t_temp) if len(t) else t for t in t_patch]
                else:
                    t_cls_p = [F.softmax((t - center) / t_temp, dim=-1) for t in t_cls]
                    t_patch_p = [F.softmax((t - patch_center) / t_temp, dim=-1) for t in t_patch]
            s_glob = [student(v, m) for v, m in zip(glob, masks)]
            s_cls = [o[0] for o in s_glob] + [student(v)[0] for v in local]
            loss_dino = dino_loss(s_cls, t_cls_p, args.student_temp)
            loss_ibot = sum(ibot_loss(student.head(student.patch_head, o[2][m]), tp, args.student_temp)
                            for o, tp, m in zip(s_glob, t_patch_p, masks)) / len(glob)
            loss_koleo = sum(koleo_loss(o[1]) for o in s_glob) / len(glob)
            loss_pixel = (sum(pixel_loss(student, o[2], v, m) for o, v, m in zip(s_glob, glob, masks) if m.any())
                          / len(glob) if use_pixel else torch.zeros((), device=device))
            loss = (loss_dino + args.ibot_weight * loss_ibot + args.koleo_weight * loss_koleo
                    + args.pixel_weight * loss_pixel)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if step < args.freeze_last_steps:  # DINO: keep the prototypes fixed at first, for stability
            for head in (student.cls_head, student.patch_head):  # the pixel head trains from the start
                for p in head.last.parameters():
                    p.grad = None
        nn.utils.clip_grad_norm_(params, args.clip)
        opt.step()
        with torch.no_grad():
            if args.objective == "dino":  # only DINO has a teacher to follow the student
                for ps, pt in zip(student.parameters(), teacher.parameters()):
                    pt.mul_(momentum).add_(ps.detach(), alpha=1 - momentum)
                center.mul_(0.9).add_(torch.cat(t_cls).mean(0, keepdim=True), alpha=0.1)
                patch_center.mul_(0.9).add_(torch.cat(t_patch).mean(0, keepdim=True), alpha=0.1)

        if step % args.log_every == 0 or step == args.steps - 1:
            # teacher entropy near 0 or near log(out_dim) would signal collapse
            tp = t_cls_p[0]
            ent = float(-(tp * tp.clamp_min(1e-12).log()).sum(-1).mean())
            rec = {"step": step, "loss": round(loss.item(), 4), "dino": round(loss_dino.item(), 4),
                   "ibot": round(loss_ibot.item(), 4), "koleo": round(loss_koleo.item(), 4),
                   "pixel": round(float(torch.as_tensor(loss_pixel).detach()), 4), "teacher_entropy": round(ent, 3), "lr": round(lr, 6),
                   "elapsed_s": round(time.time() - t_train, 1)}
            if use_stats:
                rec["stats"] = round(loss_stats.item(), 4)
            log.append(rec)
            print(json.dumps(rec), flush=True)
        stop = step == args.stop_at
        if args.checkpoint_dir and step and (step % args.checkpoint_every == 0 or step == args.steps - 1 or stop):
            ckpt = Path(args.checkpoint_dir) / f"step{step}"
            save_state(Path(args.checkpoint_dir) / STATE_FILE, {
                "step": step, "args": vars(args), "student": student.state_dict(), "teacher": teacher.state_dict(),
                "opt": opt.state_dict(), "center": center, "patch_center": patch_center,
                "numpy_rng": rng.bit_generator.state, "generator": g.get_state(), "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                "loss_log": log, "elapsed_s": time.time() - t_train, "sittings": sittings})
            save_backbone(final.backbone, ckpt, args.save_dtype)
            (ckpt / "PROVENANCE.json").write_text(json.dumps(
                {"checkpoint_of": command,
                 "step": step, "args": vars(args), "seed": args.seed, "corpus": corpus,
                 "loss_log": log, "init_from": init or None}, indent=2) + "\n")

        if stop:
            print(f"stopped after step {step} (--stop-at); --resume {args.checkpoint_dir} goes on", flush=True)
            return

    train_s = time.time() - t_train
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    save_backbone(final.backbone, out, args.save_dtype)
    tail = log[-5:] if len(log) >= 5 else log
    provenance = {
        "model": args.model_name,
        "architecture": "transformers Dinov2Model (" + {
            "pixel": "student backbone after masked pixel prediction",
            "contrastive": "student backbone after contrastive (InfoNCE) learning between two views",
            "dino": "teacher backbone after DINO+iBOT self-distillation"}[args.objective] + ")",
        "parameters": n_params,
        "command": command,
        "sittings": sittings,  # the commands of a run spread over several (resumed) sittings, in order
        "args": vars(args),
        "seed": args.seed,
        "corpus": corpus,
        "corpus_mix": weights,
        "init_from": init or None,
        "debian_packages": package_versions(),
        "training_seconds": round(train_s, 1),
        "total_seconds_last_sitting": round(time.time() - t_start, 1),
        "final_loss_mean_last_logs": round(float(np.mean([r["loss"] for r in tail])), 4),
        "loss_log": log,
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "transformers": __import__("transformers").__version__, "threads": args.threads,
                        "cpu": platform.processor() or platform.machine(), "device": args.device,
                        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None},
        "model_sha256": sha256(out / "model.safetensors"),
    }
    (out / "PROVENANCE.json").write_text(json.dumps(provenance, indent=2) + "\n")
    print(f"saved {out} ({train_s / 60:.1f} min training)", flush=True)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "peal_backend/backbones/peal-mini"))
    ap.add_argument("--model-name", default="peal-mini", help="the name PROVENANCE.json gives the weights")
    ap.add_argument("--install-packages", action="store_true", help="apt-get install the corpus packages if missing")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="1 is fastest on a busy shared CPU (no OpenMP barrier stalls)")
    ap.add_argument("--steps", type=int, default=900)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--image-size", type=int, default=28)
    ap.add_argument("--patch", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=192)
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--heads", type=int, default=3)
    ap.add_argument("--drop-path", type=float, default=0.1)
    ap.add_argument("--local-crops", type=int, default=4)
    ap.add_argument("--local-size", type=int, default=12)
    ap.add_argument("--local-scale-min", type=float, default=0.1, help="local crops cover this to 40%% of the image")
    ap.add_argument("--out-dim", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--min-lr", type=float, default=1e-5)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--warmup-frac", type=float, default=0.1)
    ap.add_argument("--ema", type=float, default=0.99)
    ap.add_argument("--teacher-temp", type=float, default=0.04)
    ap.add_argument("--student-temp", type=float, default=0.1)
    ap.add_argument("--ibot-weight", type=float, default=1.0)
    ap.add_argument("--koleo-weight", type=float, default=0.0, help="DINOv2's KoLeo regulariser on the CLS token")
    ap.add_argument("--pixel-weight", type=float, default=0.0,
                    help="masked pixel prediction (raw normalised pixels of masked patches): keeps intensity")
    ap.add_argument("--centering", choices=("sinkhorn", "ema"), default="ema",
                    help="teacher targets: Sinkhorn-Knopp equipartition (DINOv2) or DINO's EMA centre")
    ap.add_argument("--stats-weight", type=float, default=0.0,
                    help="contrastive: also predict each view's global intensity statistics (per-channel mean, std, "
                         "central mean) linearly from its CLS token, with this weight")
    ap.add_argument("--contrastive-temp", type=float, default=0.2, help="InfoNCE temperature (--objective contrastive)")
    ap.add_argument("--objective", choices=("dino", "pixel", "contrastive"), default="dino",
                    help="dino: DINO + iBOT self-distillation (+ --pixel-weight); pixel: masked pixel prediction only; "
                         "contrastive: InfoNCE between two views' CLS (+ --pixel-weight)")
    ap.add_argument("--mask-prob", type=float, default=0.5, help="share of images masked (iBOT, dino objective)")
    ap.add_argument("--init-from", default="", help="start the backbone from this save_pretrained folder")
    ap.add_argument("--mask-ratio", type=float, default=0.5, help="share of patches masked with --objective pixel")
    ap.add_argument("--jitter", type=float, default=0.2,
                    help="brightness/contrast/saturation factors drawn from 1 ± this (0: none)")
    ap.add_argument("--keep-colour", action="store_true",
                    help="no saturation jitter and no grayscale views (colour is signal in fundus photographs)")
    ap.add_argument("--clip", type=float, default=3.0)
    ap.add_argument("--freeze-last-steps", type=int, default=50)
    ap.add_argument("--crops-per-wallpaper", type=int, default=150)
    ap.add_argument("--w-domain", type=float, default=0.8, help="sampling weight of the two train pools together")
    ap.add_argument("--w-fmnist", type=float, default=0.1)
    ap.add_argument("--w-wallpapers", type=float, default=0.1)
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--checkpoint-dir", default="", help="also save the backbone that --out gets (the teacher with --objective dino, else the student) "
                         "here every --checkpoint-every steps, with its provenance")
    ap.add_argument("--checkpoint-every", type=int, default=200)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (augmentations stay on the CPU)")
    ap.add_argument("--bf16", action="store_true",
                    help="forward passes under bfloat16 autocast (on a 2-core AVX512-BF16 CPU: 1.37x with one thread, 1.09x with two)")
    ap.add_argument("--resume", default="",
                    help=f"go on from a checkpoint folder's {STATE_FILE} (same arguments; a larger --steps trains longer)")
    ap.add_argument("--stop-at", type=int, default=-1,
                    help="save the training state after this step and exit, for a run spread over several sittings")
    ap.add_argument("--save-dtype", choices=("float16", "float32"), default="float16",
                    help="dtype the weights are stored in (float16: about 5 MB)")
    args = ap.parse_args(argv)
    if args.stop_at >= 0 and not args.checkpoint_dir:
        ap.error("--stop-at needs --checkpoint-dir: the training state it stops with is saved there")
    if args.stats_weight > 0 and args.objective != "contrastive":
        ap.error("--stats-weight needs --objective contrastive")
    return args


if __name__ == "__main__":
    args = parse_args()
    if args.install_packages:
        install_packages()
    train(args)
