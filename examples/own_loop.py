"""Your model in your loop: torchvision's ResNet-18 on a long-tailed image folder, reweighted by
Meta-Weight-Net. ROOT/train/<class>/*.jpg is the training data; 10 images per class of it are
held out as the clean, balanced meta set. Saves the weights to resnet18_mwn.pt.
Usage: python examples/own_loop.py ROOT [ITERATIONS]"""

import sys

import torch
import torchvision
from torchvision import transforms as T

import mwn

root, iterations = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 2000
tf = T.Compose([T.Resize((32, 32)), T.RandomHorizontalFlip(), T.ToTensor()])
data = torchvision.datasets.ImageFolder(f"{root}/train", tf)
labels = torch.tensor(data.targets)
meta_idx = [i for c in labels.unique() for i in torch.nonzero(labels == c)[:10, 0].tolist()]
train_idx = sorted(set(range(len(data))) - set(meta_idx))


def batches(idx):  # shuffled batches of at most 100, forever
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(data, idx), min(100, len(idx)),
                                         shuffle=True, drop_last=True)  # fmt: skip
    while True:
        yield from loader


model = torchvision.models.resnet18(num_classes=len(data.classes))
optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, [iterations // 2, iterations * 3 // 4])
rw = mwn.MetaReweighter(model, optimizer, meta_net=mwn.MetaNet(100, init="flat"))

steps = zip(range(1, iterations + 1), batches(train_idx), batches(meta_idx))
for step, (x, y), (x_meta, y_meta) in steps:
    metrics = rw.step(x, y, x_meta, y_meta)  # the exact meta-weighted step, in place
    schedule.step()
    if step % 100 == 0 or step == iterations:
        print(f"iter {step}  loss {metrics['loss']:.3f}  meta loss {metrics['meta_loss']:.3f}")
torch.save(model.state_dict(), "resnet18_mwn.pt")
