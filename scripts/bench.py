"""Throughput of aelab's training loop against the tutorial's reference loop, in one process.

    python scripts/bench.py                 # CUDA if present, else CPU
    python scripts/bench.py --device cpu --steps 200 --json bench.json

Both train the same 784-256-128-32 MLP autoencoder (Adam, batch 128) on the same MNIST-shaped data
(the real MNIST test images from shared/data/mnist-t10k beside or inside the checkout when present,
else random images):

- seed-faithful: the tutorial's loop as written (per-item PIL + ToTensor DataLoader, `.to(device)` per
  batch, an if/elif switch on the regularizer, the per-latent Jacobian loop for the contractive term);
- seed TensorDataset: the same loop over a TensorDataset DataLoader;
- aelab: `aelab.training.loop.train_epoch` with the step `aelab train` makes (`aelab.training.steps.make_step`), on
  parts built from aelab's configs: on CUDA the whole step replayed as a CUDA graph, and also timed
  eagerly (trainer.cuda_graph=off) to show what the graph buys.

Cases: reg none / l1 / kl / contractive exact and Hutchinson (the seed's sigmoid model, latent 64)
and a gaussian denoising corruption; `cosine` is case none with a learning-rate schedule stepped after
every optimizer step (sched=cosine), whose cost is its `aelab / aelab plain` ratio (target: >= 0.95,
at most 5% slower). Prints samples/s and the ratio aelab / seed per case, peak
memory, aelab's epoch time at 1x, 2x and 4x the data size (cost should grow linearly), and the
issue's targets for the device, met or not. `--tf32` runs aelab with trainer.tf32=true (the seed
loops stay float32); `--compile` with trainer.compile=true (it compiles in the untimed warm-up epoch).
"""
from __future__ import annotations

import argparse
import gzip
import json
import resource
import signal
import struct
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
# ../shared beside the checkout, or a git-ignored shared/ inside it (which travels to a lent GPU)
MNIST_IMAGES = [root / "shared" / "data" / "mnist-t10k" / "t10k-images-idx3-ubyte.gz" for root in (ROOT.parent, ROOT)]
BATCH = 128

# ---- the tutorial's reference, written from the spec ------------------------------------------


class SeedAutoencoder(nn.Module):
    """The tutorial's models: ReLU MLP (latent 32), KL variant (sigmoid latent), contractive (sigmoid)."""

    def __init__(self, latent_dim=32, encoder_act=nn.ReLU, latent_act=None):
        super().__init__()
        layers = [nn.Linear(784, 256), encoder_act(), nn.Linear(256, 128), encoder_act(), nn.Linear(128, latent_dim)]
        self.encoder = nn.Sequential(*layers, *([latent_act()] if latent_act else []))
        self.decoder = nn.Sequential(nn.Linear(latent_dim, 128), nn.ReLU(), nn.Linear(128, 256), nn.ReLU(),
                                     nn.Linear(256, 784), nn.Sigmoid())

    def encode(self, x):
        return self.encoder(x)

    def forward(self, x):
        z = self.encoder(x)
        return self.decoder(z), z


def seed_l1(latent):
    return torch.mean(torch.abs(latent))


def seed_kl(latent, rho=0.05):
    rho_hat = torch.clamp(torch.mean(latent, dim=0), 1e-8, 1 - 1e-8)
    return torch.sum(rho * torch.log(rho / rho_hat) + (1 - rho) * torch.log((1 - rho) / (1 - rho_hat)))


def seed_jacobian_penalty(model, x):
    x = x.requires_grad_(True)
    z = model.encode(x)
    total = 0.0
    for i in range(z.shape[1]):
        grad_outputs = torch.zeros_like(z)
        grad_outputs[:, i] = 1.0
        col = torch.autograd.grad(z, x, grad_outputs, create_graph=True, retain_graph=True)[0]
        total = total + torch.sum(col ** 2)
    return total / x.shape[0]


class PILDigits(Dataset):
    """Per-item PIL image → ToTensor, as torchvision's MNIST with transforms.ToTensor() does."""

    def __init__(self, images_u8: np.ndarray):
        self.images = images_u8

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        from PIL import Image
        from torchvision.transforms.functional import to_tensor
        return to_tensor(Image.fromarray(self.images[i], mode="L")), 0


def seed_loop(loader, device, reg, steps, noise_factor=0.0):
    """The tutorial's train_regularized_autoencoder, timed over `steps` batches after a warm-up."""
    from aelab.build import set_matmul_precision
    set_matmul_precision(False)  # the seed runs in torch's default float32, whatever aelab ran before
    model_kw = {"kl": dict(latent_act=nn.Sigmoid),
                "contractive": dict(latent_dim=64, encoder_act=nn.Sigmoid, latent_act=nn.Sigmoid)}.get(reg, {})
    model = SeedAutoencoder(**model_kw).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.001)
    criterion = nn.MSELoss()
    weight = {"l1": 1e-3, "kl": 0.1, "contractive": 0.1}.get(reg, 0.0)
    done, warmup, start, it = 0, 5, None, iter(loader)
    for step in range(steps + warmup):
        try:
            images, _ = next(it)
        except StopIteration:
            it = iter(loader)
            images, _ = next(it)
        if step == warmup:
            sync(device)
            start, done = time.perf_counter(), 0
        images = images.view(images.size(0), -1).to(device)
        optimizer.zero_grad()
        inputs = torch.clamp(images + torch.randn_like(images) * noise_factor, 0, 1) if noise_factor else images
        reconstructed, latent = model(inputs)
        recon_loss = criterion(reconstructed, images)
        if reg == "l1":
            reg_loss = seed_l1(latent)
        elif reg == "kl":
            reg_loss = seed_kl(latent)
        elif reg == "contractive":
            reg_loss = seed_jacobian_penalty(model, inputs)
        else:
            reg_loss = torch.tensor(0.0, device=device)
        total = recon_loss + weight * reg_loss
        total.backward()
        optimizer.step()
        total.item(), recon_loss.item(), reg_loss.item()  # the seed reads every term back every step
        done += images.size(0)
    sync(device)
    return done / (time.perf_counter() - start)


# ---- aelab --------------------------------------------------------------------------------------

CASES = {  # name → aelab overrides; the seed's regularizer and noise for the same case
    "none": ([], "none", 0.0),
    "cosine": (["sched=cosine"], "none", 0.0),  # case none with a per-step schedule: what scheduling costs
    "l1": (["reg=l1", "reg.weight=1e-3"], "l1", 0.0),
    "kl": (["reg=kl", "reg.weight=0.1"], "kl", 0.0),
    "gaussian": (["corruption=gaussian", "corruption.noise_factor=0.3"], "none", 0.3),
    "contractive": (["model=contractive", "reg=contractive", "reg.weight=0.1"], "contractive", 0.0),
    "hutchinson": (["model=contractive", "reg=contractive", "reg.weight=0.1", "reg.method=hutchinson"],
                   "contractive", 0.0),
}

# the targets: (case, column, at least) per device type; "x_*" are ratios to the seed loops
TARGETS = {
    "cuda": [("cosine", "of_plain", 0.95), ("none", "aelab", 400_000), ("none", "x_faithful", 35),
             ("none", "x_tensordataset", 10),
             ("l1", "aelab", 300_000), ("kl", "aelab", 300_000), ("gaussian", "aelab", 300_000),
             ("contractive", "aelab", 150_000), ("contractive", "x_tensordataset", 75),
             ("contractive", "of_plain", 0.5)],
    "cpu": [("cosine", "of_plain", 0.95), ("none", "x_tensordataset", 1.2), ("contractive", "x_tensordataset", 3)],
}


def write_root(images: np.ndarray, root: Path) -> Path:
    """A torchvision MNIST root for aelab's own data path: train = the bench images plus one more (the
    one-sample validation split aelab requires: aelab_parts), test = the bench images."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for split, x in (("train", np.concatenate([images, images[:1]])), ("t10k", images)):
        for kind, array in (("images-idx3", x), ("labels-idx1", np.zeros(len(x), dtype=np.uint8))):
            header = struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
            (raw / f"{split}-{kind}-ubyte").write_bytes(header + array.tobytes())
    return root


def aelab_parts(root: Path, device: str, overrides: list[str]):
    """aelab's parts on write_root's n + 1 training images: the one extra is the validation split, the
    n bench images the training split (which split gets which is the seeded shuffle's choice)."""
    from hydra import compose, initialize_config_module

    from aelab.build import build
    with (root / "MNIST" / "raw" / "train-images-idx3-ubyte").open("rb") as f:
        images = struct.unpack(">I", f.read(8)[4:])[0]  # the IDX header's first dimension: n + 1
    with initialize_config_module("aelab.configs", version_base="1.3"):
        cfg = compose("train", overrides=["data=mnist", f"paths.data={root}", f"data.val_fraction={1 / images!r}",
                                          f"device={device}", f"trainer.batch_size={BATCH}", "trainer.log_every=50",
                                          *overrides])
    return build(cfg)


def aelab_epochs(parts, epochs: int) -> tuple[float, str]:
    """samples/s of aelab's own epoch loop (train_epoch: shuffle, gather on device, step, NaN watch) in
    its best epoch (as the seed loops count their best run: this machine's load varies), and how the
    step ran (cuda graph or eager)."""
    from aelab.training.checkpoint import Position
    from aelab.console import progress
    from aelab.training.faults import FiniteWatch, StopSignals
    from aelab.training.steps import make_step
    from aelab.training.loop import start_epoch, train_epoch
    from torch.utils.tensorboard import SummaryWriter

    with tempfile.TemporaryDirectory() as logs, progress(1) as bar, StopSignals() as stop:
        writer = SummaryWriter(logs)
        watch = FiniteWatch(parts.device, ("total", "recon", "reg"), Path(logs) / "none")
        pos = Position()
        steps_per_epoch = -(-len(parts.data.train) // parts.trainer.batch_size)
        parts.schedule.start(parts.optimizer, parts.device, (epochs + 1) * steps_per_epoch, steps_per_epoch)
        step = make_step(parts, pos, watch, print)
        times = []
        for _ in range(epochs + 1):  # the first epoch warms up
            start_epoch(parts, pos)
            sync(parts.device)
            begin = time.perf_counter()
            train_epoch(parts, pos, step, writer, bar, watch, stop)
            if stop.requested:  # SIGTERM or Ctrl-C: training would save a checkpoint; a benchmark just ends
                print(f"bench: stopped by {signal.Signals(stop.received).name}", file=sys.stderr)
                sys.exit(128 + stop.received)
            sync(parts.device)
            times.append(time.perf_counter() - begin)
            pos.order = None
        watch.check()
        writer.close()
    return (pos.seen / min(times[1:]) if epochs else 0.0), getattr(step, "mode", "eager")  # the best epoch


def optimizer_step_us(device: str, steps: int = 200) -> dict:
    """Microseconds per Adam step on the seed MLP's parameters (random gradients): torch's fused
    kernel as is, and aelab's SplitFusedAdam (the same kernel, tensors cut into pieces on CUDA, whole
    on the CPU). On CUDA each step is replayed from a CUDA graph, as in training."""
    from aelab.optim import SplitFusedAdam
    from aelab.training.steps import CudaGraphs, capturable
    out = {}
    for name, make in (("torch fused Adam", lambda ps: torch.optim.Adam(ps, fused=True)),
                       ("aelab SplitFusedAdam", SplitFusedAdam)):
        torch.manual_seed(0)
        model = SeedAutoencoder().to(device)
        params = list(model.parameters())
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer = make(params)
        for _ in range(3):
            optimizer.step()
        run = optimizer.step
        if torch.device(device).type == "cuda":
            with capturable(optimizer):
                run = CudaGraphs().capture(lambda _: optimizer.step(), None)
        sync(device)
        begin = time.perf_counter()
        for _ in range(steps):
            run()
        sync(device)
        out[name] = (time.perf_counter() - begin) / steps * 1e6
    return out


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def peak_memory(device) -> str:
    if torch.device(device).type == "cuda":
        return f"{torch.cuda.max_memory_allocated() / 2**20:.0f} MiB GPU"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB RSS"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=150, help="timed steps of each seed loop")
    p.add_argument("--epochs", type=int, default=3, help="timed aelab epochs after a warm-up one, per round")
    p.add_argument("--repeat", type=int, default=3, help="rounds, each a run of every loop in turn; the best counts")
    p.add_argument("--n", type=int, default=10000, help="training images")
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--json", default="", help="also write the results here")
    p.add_argument("--tf32", action="store_true", help="aelab with trainer.tf32=true")
    p.add_argument("--compile", action="store_true", help="aelab with trainer.compile=true")
    args = p.parse_args()
    torch.manual_seed(0)
    found = [path for path in MNIST_IMAGES if path.is_file()]
    if found:
        data = np.frombuffer(gzip.decompress(found[0].read_bytes()), np.uint8, offset=16).reshape(-1, 28, 28)
        source = "MNIST t10k"
    else:
        data = np.random.default_rng(0).integers(0, 256, (args.n, 28, 28), dtype=np.uint8)
        source = "random"
    data = np.resize(data, (args.n, 28, 28))
    name = torch.cuda.get_device_name() if torch.device(args.device).type == "cuda" else "CPU"
    print(f"device={args.device} ({name}) tf32={args.tf32} compile={args.compile} "
          f"torch={torch.__version__} threads={torch.get_num_threads()} data={source} n={args.n} batch={BATCH}",
          flush=True)
    pil_loader = DataLoader(PILDigits(data), batch_size=BATCH, shuffle=True)
    tensor = torch.tensor(data, dtype=torch.float32).div(255).unsqueeze(1)
    tensor_loader = DataLoader(TensorDataset(tensor, torch.zeros(len(tensor))), batch_size=BATCH, shuffle=True)
    cuda = torch.device(args.device).type == "cuda"
    extra = (["trainer.tf32=true"] if args.tf32 else []) + (["trainer.compile=true"] if args.compile else [])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = write_root(data, Path(tmp))
        for case in args.cases.split(","):
            overrides, reg, noise = CASES[case]
            steps = max(args.steps // 8, min(args.steps, 10)) if reg == "contractive" else args.steps
            parts, faithful, tensor_sps, ours = aelab_parts(root, args.device, [*overrides, *extra]), 0.0, 0.0, 0.0
            # the loops take turns, round after round: a spell of other load on the machine slows each alike
            for _ in range(args.repeat):
                faithful = max(faithful, seed_loop(pil_loader, args.device, reg, steps, noise))
                tensor_sps = max(tensor_sps, seed_loop(tensor_loader, args.device, reg, steps, noise))
                sps, mode = aelab_epochs(parts, args.epochs)
                ours = max(ours, sps)
            plain = None
            if case == "cosine":  # its cost: paired with the plain step, epoch for epoch, in alternation
                plain_parts, plain = aelab_parts(root, args.device, extra), 0.0
                for _ in range(3 * args.repeat):
                    plain = max(plain, aelab_epochs(plain_parts, 1)[0])
                    ours = max(ours, aelab_epochs(parts, 1)[0])
            row = {"case": case, "seed_faithful": faithful, "seed_tensordataset": tensor_sps, "aelab": ours,
                   "step_mode": mode, "x_faithful": ours / faithful, "x_tensordataset": ours / tensor_sps,
                   "plain_same_rounds": plain}  # x_* ratios: from the rounds with the seed loops
            if cuda:
                row["aelab_eager"], _ = aelab_epochs(aelab_parts(root, args.device, [*overrides, *extra,
                                                                                    "trainer.cuda_graph=off"]),
                                                     args.epochs)
            rows.append(row)
            print(f"{case:12s} seed-faithful {faithful:9.0f}  seed-TensorDataset {tensor_sps:9.0f}  "
                  f"aelab {ours:9.0f} samples/s ({mode})   aelab/seed {ours / faithful:6.2f}x / "
                  f"{ours / tensor_sps:6.2f}x" + (f"   eager {row['aelab_eager']:9.0f}" if cuda else ""), flush=True)
        plain = next((r["aelab"] for r in rows if r["case"] == "none"), None)
        for r in rows:
            paired = r.pop("plain_same_rounds")
            r["of_plain"] = r["aelab"] / (paired or plain) if (paired or plain) else None
        scaling = {}
        for factor in (1, 2, 4):
            big = write_root(np.resize(data, (args.n * factor, 28, 28)), Path(tmp) / f"x{factor}")
            sps, _ = aelab_epochs(aelab_parts(big, args.device, extra), 1)
            scaling[factor] = args.n * factor / sps
            print(f"epoch at {factor}x data ({args.n * factor} images): {scaling[factor]:.3f} s "
                  f"({scaling[factor] / scaling[1]:.2f}x the 1x epoch)", flush=True)
    adam = optimizer_step_us(args.device)
    print("Adam step alone (seed MLP, 475k parameters): " + ", ".join(f"{k} {v:.1f} us" for k, v in adam.items()))
    print(f"peak memory: {peak_memory(args.device)}")
    eager_head = " aelab eager |" if cuda else ""
    print(f"\n| case | seed-faithful | seed TensorDataset | aelab |{eager_head} aelab / faithful | "
          f"aelab / TensorDataset | aelab / aelab plain |")
    print("| --- | ---: | ---: | ---: |" + (" ---: |" if cuda else "") + " ---: | ---: | ---: |")
    for r in rows:
        eager = f" {r['aelab_eager']:,.0f} |" if cuda else ""
        of_plain = f"{r['of_plain']:.2f}x" if r["of_plain"] else ""
        print(f"| {r['case']} | {r['seed_faithful']:,.0f} | {r['seed_tensordataset']:,.0f} | {r['aelab']:,.0f} |"
              f"{eager} {r['x_faithful']:.2f}x | {r['x_tensordataset']:.2f}x | {of_plain} |")
    verdicts = targets(rows, "cuda" if cuda else "cpu")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": args.device, "device_name": name, "tf32": args.tf32,
                                               "compile": args.compile, "rows": rows, "epoch_seconds": scaling,
                                               "targets": verdicts, "adam_step_us": adam,
                                               "peak_memory": peak_memory(args.device), "argv": sys.argv,
                                               "date": time.strftime("%Y-%m-%d")}, indent=2))


def targets(rows: list[dict], kind: str) -> list[dict]:
    """The issue's targets for this device type, each with the measured value and met / NOT met."""
    by_case = {r["case"]: r for r in rows}
    verdicts = []
    print("\n| target | measured | |")
    print("| --- | ---: | --- |")
    for case, column, floor in TARGETS[kind]:
        if case not in by_case:
            continue
        value = by_case[case][column]
        met = value is not None and value >= floor
        unit = "" if column == "aelab" else "x"
        label = {"aelab": "samples/s", "x_faithful": "x seed-faithful", "x_tensordataset": "x seed TensorDataset",
                 "of_plain": "x aelab plain"}[column]
        print(f"| {case}: >= {floor:,g} {label} | {value:,.2f}{unit} | {'met' if met else 'NOT met'} |")
        verdicts.append({"case": case, "column": column, "target": floor, "value": value, "met": met})
    return verdicts


if __name__ == "__main__":
    main()
