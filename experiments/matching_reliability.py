"""Is MGD's channel matching signal or noise at a given input size and stem?

For each stage: the MGD assignment (Eq. 9) is solved twice, on two disjoint halves of the
images, and compared. If the feature maps carry enough information to pair channels, the two
halves agree on most teacher channels; if not, they agree about as often as two random
balanced assignments (1 / Cs). Also printed: the feature map size, the matched cost and the
cost of a random pairing (the mean of the cost matrix). A 1x1 map reduces the cosine channel
distance to a sign test per image (0 or 4), which is the case of the ImageNet stem's last
stage at 32 px.

    python experiments/matching_reliability.py /usr/share/datasets/fashion-mnist --dataset fashion-mnist \\
        --image-size 32 --teacher-checkpoint T --student-checkpoint S     # trained networks
    python experiments/matching_reliability.py ... --image-size 32 --stem small   # random weights
"""
from __future__ import annotations

import argparse

import torch


from moco_mgd.losses import mgd
from moco_mgd.checkpoints.formats import load_frozen_teacher, load_pretrained_backbone
from moco_mgd.models.resnet import RESNET_ARCHS, STEMS, build_resnet
from moco_mgd.data import DATASETS, build_dataset, eval_transform, random_subset
from moco_mgd.losses.mgd_distiller import MGDistiller
from moco_mgd.training.matching import collect_matching_costs
from moco_mgd.models.stages import STAGES, forward_with_stages


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data")
    parser.add_argument("--dataset", default="imagefolder", choices=DATASETS)
    parser.add_argument("--teacher-checkpoint", default="", help="default: a teacher with random weights")
    parser.add_argument("--student-checkpoint", default="", help="default: a student with random weights")
    parser.add_argument("--teacher-arch", default="resnet50", choices=RESNET_ARCHS)
    parser.add_argument("-a", "--arch", default="resnet18", choices=RESNET_ARCHS)
    parser.add_argument("--stem", default="imagenet", choices=STEMS)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--images", type=int, default=2048, help="split into two halves")
    parser.add_argument("-b", "--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def summed_costs(distiller: MGDistiller, student: torch.nn.Module, teacher: torch.nn.Module, images,
                 batch_size: int) -> list[torch.Tensor]:
    """Each stage's ``[Cs, Ct]`` channel cost (Eq. 6, cosine form), summed over ``images``, in float64."""
    collect_matching_costs(distiller, student, teacher, torch.utils.data.DataLoader(images, batch_size))
    return distiller.accumulated_costs()


def main(argv: list[str] | None = None) -> list[dict]:
    args = get_args_parser().parse_args(argv)
    torch.manual_seed(args.seed)
    if args.teacher_checkpoint:
        teacher = load_frozen_teacher(args.teacher_arch, args.teacher_checkpoint, args.stem)
    else:
        teacher = build_resnet(args.teacher_arch, stem=args.stem).eval().requires_grad_(False)
    student = build_resnet(args.arch, stem=args.stem)
    if args.student_checkpoint:
        load_pretrained_backbone(student, args.arch, args.student_checkpoint, "--student-checkpoint")
    student.eval()    # as a matching update runs the networks
    distiller = MGDistiller.from_models(teacher, student)
    images = random_subset(build_dataset(args.dataset, args.data, "train", eval_transform(args.image_size)),
                           args.images, args.seed)
    half = args.images // 2
    halves = [torch.utils.data.Subset(images, range(half)), torch.utils.data.Subset(images, range(half, 2 * half))]
    first, second = (summed_costs(distiller, student, teacher, h, args.batch_size) for h in halves)
    with torch.no_grad():
        sizes = [f.shape[-1] for f in forward_with_stages(student, images[0][0].unsqueeze(0))[1]]
    rows = []
    for stage, size, cost_a, cost_b in zip(STAGES, sizes, first, second):
        a, b = mgd.balanced_assignment(cost_a), mgd.balanced_assignment(cost_b)
        total = cost_a + cost_b
        matched = float(total[a, torch.arange(len(a))].mean()) / (2 * half)
        rows.append({"stage": stage, "map": f"{size}x{size}", "agreement": float((a == b).float().mean()),
                     "chance": 1.0 / total.shape[0], "matched_cost": matched,
                     "random_cost": float(total.mean()) / (2 * half)})
    print(f"{args.arch} <- {args.teacher_arch}, {args.stem} stem, {args.image_size} px, 2 x {half} images; "
          f"teacher {'trained' if args.teacher_checkpoint else 'random'}, "
          f"student {'trained' if args.student_checkpoint else 'random'}")
    print("| stage | map | halves agree | chance | matched cost | random-pairing cost |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['stage']} | {r['map']} | {100 * r['agreement']:.1f}% | {100 * r['chance']:.1f}% | "
              f"{r['matched_cost']:.3f} | {r['random_cost']:.3f} |")
    return rows


if __name__ == "__main__":
    main()
