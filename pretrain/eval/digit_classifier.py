"""A small CNN digit classifier trained on real digits, to score generated ones: its accuracy on samples of
class c says whether the generator drew a c, and its penultimate features give a Frechet distance
between real and generated sets (FID's recipe, with a feature space that fits 16 px digits)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data_pipeline.loader import ResumableLoader
from pretrain.diffusion.transforms import pixel_transform


class DigitClassifier(nn.Module):
    """Two conv stages (each halving the side) and a 128-d feature layer; inputs [B, C, S, S] in [-1, 1]."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 16, width: int = 32) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.fc = nn.Linear(2 * width * (image_size // 4) ** 2, 128)
        self.head = nn.Linear(128, num_classes)

    def features(self, x: Tensor) -> Tensor:
        return F.relu(self.fc(self.convs(x)))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def load_images(shards: str, split: str, image_size: int, channels: int = 1) -> tuple[Tensor, Tensor]:
    """All images of a split [N, C, S, S] in [-1, 1] and their labels, in shard order."""
    transform = pixel_transform(image_size, channels, train=False)
    loader = ResumableLoader(shards, batch_size=256, transform=transform, shuffle_buffer=0, infinite=False, split=split)
    images, labels = zip(*((b["image"], b["label"]) for b in loader))
    return torch.cat(images), torch.cat(labels)


def random_shift(x: Tensor, generator: torch.Generator, max_shift: int = 1) -> Tensor:
    """Translate each image by up to `max_shift` pixels (background -1 fills in): cheap augmentation."""
    padded = F.pad(x, [max_shift] * 4, value=-1.0)
    size = x.shape[-1]
    out = torch.empty_like(x)
    offsets = torch.randint(0, 2 * max_shift + 1, (x.shape[0], 2), generator=generator)
    for i, (dy, dx) in enumerate(offsets.tolist()):
        out[i] = padded[i, :, dy : dy + size, dx : dx + size]
    return out


def train_classifier(
    images: Tensor, labels: Tensor, num_classes: int = 10, epochs: int = 30, batch_size: int = 64, seed: int = 0
) -> DigitClassifier:
    """Adam on shifted copies of the real images; deterministic for a seed."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = DigitClassifier(images.shape[1], num_classes, images.shape[-1])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    steps = epochs * -(-len(images) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), batch_size):
            index = order[start : start + batch_size]
            loss = F.cross_entropy(model(random_shift(images[index], generator)), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


@torch.no_grad()
def classify(model: DigitClassifier, images: Tensor, batch_size: int = 512) -> tuple[Tensor, Tensor]:
    """(predicted labels [N], features [N, 128])."""
    predictions, features = [], []
    for start in range(0, len(images), batch_size):
        feats = model.features(images[start : start + batch_size].clamp(-1, 1))
        predictions.append(model.head(feats).argmax(dim=1))
        features.append(feats)
    return torch.cat(predictions), torch.cat(features)
