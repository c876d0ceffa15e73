"""How hard does each loss pull on the student? Gradient norms of InfoNCE, MGD (per stage) and
the embedding losses, from one forward of a student and a teacher on real training images.

A loss weight (or MGD's loss factor) only means something next to InfoNCE's gradient: this
measures, on batches of augmented image pairs, the gradient norm of each loss, at weight 1,
on the student's embedding ``q`` and on all the student's backbone weights. MGD is matched
first (on ``--mgd-samples`` images), as a run does before its first step. Nothing is trained.

    python experiments/loss_balance.py /usr/share/datasets/fashion-mnist --dataset fashion-mnist \\
        --image-size 32 --teacher-checkpoint output/fmnist/teacher/checkpoint_0015.pth.tar

MGD's loss is a sum over positions divided by ``batch x loss_factor``: its gradient grows with
the feature maps' area, so a factor tuned at 224 px is (224/32)^2 = 49x weaker at 32 px.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn as nn


from moco_mgd.checkpoints.formats import load_frozen_teacher, load_pretrained_backbone
from moco_mgd.models.resnet import RESNET_ARCHS, STEMS
from moco_mgd.data import DATASETS, TwoCropsTransform, build_dataset, eval_transform, pretrain_transform, random_subset
from moco_mgd.losses.mgd import REDUCERS
from moco_mgd.losses.mgd_distiller import MGDistiller
from moco_mgd.training.matching import collect_matching_costs
from moco_mgd.losses.embedding import EmbeddingDistiller
from moco_mgd.models.moco import MoCo
from moco_mgd.models.stages import forward_with_stages

EMBEDDING = {"CCKD": {"cckd_weight": 1.0}, "DisCo": {"disco_weight": 1.0}, "SEED": {"seed_weight": 1.0}}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", help="dataset root (image folders) or the Fashion-MNIST IDX directory")
    parser.add_argument("--dataset", default="imagefolder", choices=DATASETS)
    parser.add_argument("--teacher-checkpoint", required=True)
    parser.add_argument("--teacher-arch", default="resnet50", choices=RESNET_ARCHS)
    parser.add_argument("--student-checkpoint", default="", help="a pretrained student (default: random weights)")
    parser.add_argument("-a", "--arch", default="resnet18", choices=RESNET_ARCHS)
    parser.add_argument("--stem", default="imagenet", choices=STEMS)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("-b", "--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=4, help="batches averaged over")
    parser.add_argument("--moco-k", type=int, default=4096)
    parser.add_argument("--moco-t", type=float, default=0.2)
    parser.add_argument("--mgd-reducer", default="amp", choices=REDUCERS)
    parser.add_argument("--mgd-loss-factor", type=float, default=1e4)
    parser.add_argument("--mgd-samples", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def gradient_norms(loss: torch.Tensor, q: torch.Tensor, params: list[nn.Parameter]) -> tuple[float, float]:
    """``(||dL/dq||, ||dL/dtheta||)`` over the batch's embeddings and all the given weights.

    MGD acts on intermediate features, not on ``q``: its gradient on ``q`` is 0.
    """
    grads = torch.autograd.grad(loss, [q, *params], retain_graph=True, allow_unused=True)
    backbone = torch.sqrt(sum(g.pow(2).sum() for g in grads[1:] if g is not None))
    return (float(grads[0].norm()) if grads[0] is not None else 0.0), float(backbone)


def main(argv: list[str] | None = None) -> dict[str, tuple[float, float, float]]:
    args = get_args_parser().parse_args(argv)
    torch.manual_seed(args.seed)
    teacher = load_frozen_teacher(args.teacher_arch, args.teacher_checkpoint, args.stem, with_head=True)
    model = MoCo(args.arch, 128, args.moco_k, T=args.moco_t, mlp=True, stem=args.stem)
    if args.student_checkpoint:
        load_pretrained_backbone(model.encoder_q, args.arch, args.student_checkpoint, "--student-checkpoint")
        model.encoder_k.load_state_dict(model.encoder_q.state_dict())
    mgd = MGDistiller.from_models(teacher, model.encoder_q, reducer=args.mgd_reducer, loss_factor=args.mgd_loss_factor)
    images = build_dataset(args.dataset, args.data, "train", eval_transform(args.image_size))
    matching = torch.utils.data.DataLoader(random_subset(images, args.mgd_samples, args.seed), args.batch_size)
    collect_matching_costs(mgd, model.encoder_q, teacher, matching)
    mgd.update_matching()
    pairs = build_dataset(args.dataset, args.data, "train", TwoCropsTransform(pretrain_transform(args.image_size)))
    loader = torch.utils.data.DataLoader(pairs, args.batch_size, shuffle=True, drop_last=True)
    backbone = [p for name, p in model.encoder_q.named_parameters() if not name.startswith("fc.")]
    rows: dict[str, list[tuple[float, float, float]]] = {}   # loss -> per batch (value, on q, on backbone)
    stages: dict[str, list[float]] = {}                        # MGD stage -> per batch weighted value
    model.train()
    for i, ((im_q, im_k), _) in enumerate(loader):
        if i == args.batches:
            break
        out = model(im_q, im_k, with_stages=True)
        logits, labels, q = out.logits, out.labels, out.query
        with torch.no_grad():
            teacher_out, teacher_stages = forward_with_stages(teacher, im_q)
        losses = {"InfoNCE": nn.functional.cross_entropy(logits, labels)}
        losses[f"MGD (factor {args.mgd_loss_factor:g})"], per_stage = mgd(out.query_stages, teacher_stages)
        for name, settings in EMBEDDING.items():
            losses[name] = EmbeddingDistiller(128, 128, seed_queue=args.moco_k, **settings)(q, teacher_out)[0]
        for name, loss in losses.items():
            rows.setdefault(name, []).append((float(loss.detach()), *gradient_norms(loss, q, backbone)))
        for stage, value in zip(mgd.stage_names, per_stage.tolist()):
            stages.setdefault(stage, []).append(value)
    means = {name: tuple(sum(column) / len(column) for column in zip(*values)) for name, values in rows.items()}
    reference = means["InfoNCE"][2]
    print(f"student {args.arch} ({'pretrained' if args.student_checkpoint else 'random weights'}), teacher "
          f"{args.teacher_arch}, {args.image_size} px, batch {args.batch_size}, mean over {args.batches} batches; "
          f"losses at weight 1")
    print("| loss | value | grad norm on q | grad norm on backbone | backbone grad / InfoNCE's |")
    print("|---|---:|---:|---:|---:|")
    for name, (value, on_q, on_backbone) in means.items():
        print(f"| {name} | {value:.4g} | {on_q:.4g} | {on_backbone:.4g} | {on_backbone / reference:.3g} |")
        if name.startswith("MGD"):
            for stage, values in stages.items():
                print(f"| . {stage} (weighted share of MGD) | {sum(values) / len(values):.4g} | | | |")
    return means


if __name__ == "__main__":
    main()
