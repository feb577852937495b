"""The data that train.py, probe.py and visualize.py share: data sets, normalisation, the
authors' augmentation, image folders whose randomness is a pure function of (seed, epoch, image).

Small data sets (CIFAR-10/100, Fashion-MNIST, generated images) are held as one uint8 tensor and
whole batches are cropped, flipped and resized on the training device; image folders are read by
DataLoader workers. An unreadable image stops a run with one line naming the file.
"""
import math
import os

import torch
import torch.nn.functional as F
import torchvision
import torchvision.transforms as T
from torch.utils.data import default_collate

# Per-channel mean and std of each data set's training images (ImageNet's for image folders).
MEAN_STD = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "fashion_mnist": ((0.2860,) * 3, (0.3530,) * 3),
    "imagefolder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "synthetic": ((0.5,) * 3, (0.25,) * 3),
}
DATASETS = tuple(MEAN_STD)
OFFLINE_HINT = ("offline choices: --dataset fashion_mnist --data DIR with the Debian copy "
                "unpacked into DIR/FashionMNIST/raw (see README), --dataset imagefolder --data DIR, "
                "or --dataset synthetic")


def synthetic_images(n, size, seed, num_classes=10):
    """Generated images (n, 3, size, size) uint8 and labels: per-class smooth colour templates
    plus noise, so the classes are linearly separable. Templates depend on nothing but size."""
    g = torch.Generator().manual_seed(1234)
    templates = torch.rand(num_classes, 3, 4, 4, generator=g)               # (K, 3, 4, 4)
    templates = F.interpolate(templates, size=(size, size), mode="bilinear", align_corners=False)
    g.manual_seed(seed)
    labels = torch.randint(num_classes, (n,), generator=g)                   # (n,)
    x = templates[labels] + 0.15 * torch.randn(n, 3, size, size, generator=g)  # (n, 3, S, S)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8), labels


def load_memory_dataset(name, root, train, size, synthetic_size=1024):
    """CIFAR-10/100, Fashion-MNIST or synthetic as (uint8 images (n, C, h, w), labels (n,))."""
    if name == "synthetic":
        n = synthetic_size if train else max(synthetic_size // 4, 1)
        return synthetic_images(n, size, seed=1 if train else 2)
    cls = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100,
           "fashion_mnist": torchvision.datasets.FashionMNIST}[name]
    try:
        ds = cls(root, train=train, download=True)
    except (OSError, RuntimeError) as e:
        raise SystemExit(f"error: could not load or download {name} into {root} ({e}); "
                         f"{OFFLINE_HINT}") from None
    x = torch.as_tensor(ds.data)
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)  # (n, C, h, w): 1 or 3 channels
    return x.contiguous(), torch.as_tensor(ds.targets)


def to_model_input(x, size, mean, std):
    """uint8 or [0,1] float batch (B, C, h, w) -> normalised float (B, 3, size, size)."""
    x = x.float() / 255 if x.dtype == torch.uint8 else x
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True,
                          align_corners=False).clamp(0, 1)
    x = x.expand(-1, 3, -1, -1)                            # grayscale -> 3 channels
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


def augment(x, size, r, min_scale=0.5):
    """RandomResizedCrop(scale=(min_scale, 1), ratio=(3/4, 4/3), bicubic) + horizontal flip on a
    whole uint8 batch (B, C, h, w) on its device, from uniform numbers r (B, 5). Returns floats
    in [0, 1], (B, C, size, size). Unlike torchvision's rejection loop, a crop larger than the
    image is clamped to the image side."""
    scale = min_scale + (1 - min_scale) * r[:, 0]
    log_ratio = math.log(3 / 4) + r[:, 1] * (math.log(4 / 3) - math.log(3 / 4))
    w = (scale * log_ratio.exp()).sqrt().clamp(max=1)      # crop width / image width
    h = (scale / log_ratio.exp()).sqrt().clamp(max=1)
    tx, ty = (2 * r[:, 2] - 1) * (1 - w), (2 * r[:, 3] - 1) * (1 - h)  # crop centre in [-1, 1]
    flip = torch.where(r[:, 4] < 0.5, -1.0, 1.0)
    zero = torch.zeros_like(w)
    theta = torch.stack([torch.stack([w * flip, zero, tx], 1),
                         torch.stack([zero, h, ty], 1)], 1)  # (B, 2, 3)
    grid = F.affine_grid(theta, (x.shape[0], x.shape[1], size, size), align_corners=False)
    out = F.grid_sample(x.float() / 255, grid, mode="bicubic", padding_mode="border",
                        align_corners=False)                # (B, C, size, size)
    return out.clamp(0, 1)


def find_image_folder(path, split="train"):
    """--data /imagenet reads /imagenet/train when it exists, else the folder itself."""
    if not os.path.isdir(path):
        raise SystemExit(f"error: no such folder {path}: pass --data DIR holding one sub-folder "
                         f"of images per class (or DIR/{split}/ laid out so)")
    sub = os.path.join(path, split)
    return sub if os.path.isdir(sub) else path


class SeededFolder(torch.utils.data.Dataset):
    """An ImageFolder whose random transform is a pure function of (seed, epoch, index).

    Keys are (epoch, index) pairs, so augmentation does not depend on the worker count, the
    number of processes or on resuming: exact resume and DDP == one process hold here too."""
    def __init__(self, root, transform, seed):
        try:
            self.folder = torchvision.datasets.ImageFolder(root)
        except (FileNotFoundError, RuntimeError) as e:
            raise SystemExit(f"error: {root} is not an image folder ({e}): it needs one "
                             f"sub-folder of images per class") from None
        self.transform, self.seed = transform, seed

    def __len__(self):
        return len(self.folder)

    def __getitem__(self, key):
        epoch, i = key
        path, label = self.folder.samples[i]
        try:
            img = self.folder.loader(path)
        except Exception as e:  # a message instead: readable() raises it in the main process
            return f"cannot read image {path} ({type(e).__name__}: {e})"
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash((self.seed, epoch, i)) & (2 ** 63 - 1))
            return self.transform(img), label


def collate_images(items):
    """default_collate of (image, label) pairs; the message of the first unreadable image
    instead, so that a bad file stops the run with one line rather than a worker's traceback."""
    bad = [item for item in items if isinstance(item, str)]
    return bad[0] if bad else default_collate(items)


def readable(item):
    """A SeededFolder item or collated batch; a one-line SystemExit naming an unreadable file."""
    if isinstance(item, str):
        raise SystemExit(f"error: {item}: remove or replace that file, then run again")
    return item


def folder_batches(loader, device):
    """The images of each batch of a SeededFolder loader, on the device; a batch with an
    unreadable image stops here, before any weight sees it."""
    for batch in loader:
        yield readable(batch)[0].to(device, non_blocking=True)  # (B, 3, S, S)


def folder_transform(size, train, mean, std, min_scale=0.5):
    """The authors' train (RandomResizedCrop bicubic + flip) or test (resize + centre crop)."""
    bicubic = T.InterpolationMode.BICUBIC
    if train:
        ops = [T.RandomResizedCrop(size, scale=(min_scale, 1.0), interpolation=bicubic),
               T.RandomHorizontalFlip()]
    else:
        ops = [T.Resize(int(size * 256 / 224), interpolation=bicubic), T.CenterCrop(size)]
    return T.Compose(ops + [T.ToTensor(), T.Normalize(mean, std)])
