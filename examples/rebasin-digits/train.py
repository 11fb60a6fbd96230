"""Train the digits example's checkpoints: two bases from different initialisations, four
fine-tunes of each, small MLPs saved as safetensors with plain-chain key names.

    python examples/rebasin-digits/train.py            # rewrites models/ and test.npz here

Needs torch and scikit-learn (only this script does: the recipes, the evaluation and CI read
the committed files). Deterministic: seeded initialisation and shuffles, one thread,
deterministic torch kernels. Other seeds and widths: --seeds 3 4 --width 96 --out /tmp/digits.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
SPLIT_SEED = 0
BASE_SEEDS = (1, 2)  # base-1, base-2: the two initialisations
WIDTH = 64
DEPTH = 3  # hidden layers
BASE_EPOCHS = 30
FT_EPOCHS = 20
BASE_LR = 0.01
FT_LR = 0.01
FT_OTHERS = 0.03  # the share of the other digits a fine-tune still sees
N_FINETUNES = 4


class MLP(torch.nn.Module):
    """64 -> width (x depth) -> 10, ReLU; `layers.N.weight` / `layers.N.bias` key names."""

    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        sizes = [64] + [width] * depth + [10]
        self.layers = torch.nn.ModuleList(
            torch.nn.Linear(a, b) for a, b in zip(sizes, sizes[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:-1]:
            x = torch.relu(layer(x))
        return self.layers[-1](x)


def data():
    # imported here so that the tests can import MLP without scikit-learn
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    return train_test_split(x, y, test_size=0.33, random_state=SPLIT_SEED, stratify=y)


def train(model, x, y, epochs: int, lr: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(epochs):
        for idx in torch.randperm(len(xt), generator=gen).split(32):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def finetune_shards(x, y, seed: int):
    """Fine-tune i sees mostly digits 2i..2i+4 (mod 10): different tasks from one base."""
    rng = np.random.default_rng(seed)
    for i in range(N_FINETUNES):
        focus = np.isin(y, [(2 * i + k) % 10 for k in range(5)])
        keep = focus | (rng.random(len(y)) < FT_OTHERS)
        yield x[keep], y[keep]


def save(model, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=HERE)
    ap.add_argument("--width", type=int, default=WIDTH)
    ap.add_argument("--depth", type=int, default=DEPTH)
    ap.add_argument("--seeds", type=int, nargs=2, default=BASE_SEEDS)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    x_train, x_test, y_train, y_test = data()
    args.out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out / "test.npz", x=x_test, y=y_test)
    for n, seed in enumerate(args.seeds, 1):
        name = f"base-{n}"
        torch.manual_seed(seed)
        base = MLP(args.width, args.depth)
        train(base, x_train, y_train, BASE_EPOCHS, lr=BASE_LR, seed=seed)
        save(base, args.out / "models" / f"{name}.safetensors")
        print(f"{name}: {accuracy(base, x_test, y_test):.3f}")
        for i, (xs, ys) in enumerate(finetune_shards(x_train, y_train, seed)):
            ft = MLP(args.width, args.depth)
            ft.load_state_dict(base.state_dict())
            train(ft, xs, ys, FT_EPOCHS, lr=FT_LR, seed=100 * seed + i)
            save(ft, args.out / "models" / name / f"ft-{i}.safetensors")
            print(f"  {name}/ft-{i}: {accuracy(ft, x_test, y_test):.3f}")


if __name__ == "__main__":
    main()
