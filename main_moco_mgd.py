#!/usr/bin/env python
"""MoCo-v2 pretraining with Matching Guided Distillation: a drop-in for MoCo's main_moco.py.

Same flags and defaults as facebookresearch/moco's main_moco.py, plus the MGD flags. Without
--teacher-checkpoint (or with --no-mgd) it is plain MoCo, which is also how to train a teacher.
"""
from __future__ import annotations

import argparse
import sys

from moco_mgd.losses.cckd import KERNELS
from moco_mgd.losses.mgd import REDUCERS
from moco_mgd.models.resnet import RESNET_ARCHS, STEMS
from moco_mgd.runtime import launch
from moco_mgd.data import DATASETS, VAL_HOLDOUT_HELP
from moco_mgd.runtime.precision import AMP_MODES
from moco_mgd.training.checks import validate
from moco_mgd.training.config import PretrainConfig
from moco_mgd.training.flags import moco_argument_parser
from moco_mgd.training.pretrain import pretrain


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser, moco = moco_argument_parser(
        "MoCo-v2 + MGD pretraining", "main_moco.py", add_help,
        data_help="dataset root: reads DIR/train (image folders); for fashion-mnist the IDX directory "
                  "(default: Debian's /usr/share/datasets/fashion-mnist)",
        arch_help="student architecture (MoCo's default is resnet50: pass it to train a teacher)",
        schedule_help="epochs at which lr drops x0.1 (ignored with --cos)",
        resume_help="checkpoint to resume from (default: the newest complete checkpoint in --output-dir, if any)")
    moco.add_argument("--moco-dim", type=int)
    moco.add_argument("--moco-k", type=int, help="queue size: a multiple of the global batch")
    moco.add_argument("--moco-m", type=float)
    moco.add_argument("--moco-t", type=float)
    moco.add_argument("--mlp", action="store_true", help="MoCo-v2 MLP head")
    moco.add_argument("--aug-plus", action="store_true", help="MoCo-v2 augmentations (blur)")
    moco.add_argument("--cos", action="store_true", help="cosine learning-rate schedule")

    mgd = parser.add_argument_group("Matching Guided Distillation")
    mgd.add_argument("--teacher-arch", choices=RESNET_ARCHS)
    mgd.add_argument("--teacher-checkpoint", help="MoCo-v2 checkpoint of the teacher "
                     "(e.g. moco_v2_200ep_pretrain.pth.tar); none: plain MoCo-v2")
    mgd.add_argument("--mgd-reducer", choices=REDUCERS,
                     help="teacher channel reduction: absolute max pooling, random drop, sparse matching, max, avg")
    mgd.add_argument("--mgd-loss-factor", type=float, help="MGD loss is divided by batch x this")
    mgd.add_argument("--mgd-stage-weights", nargs="+", type=float, metavar="W",
                     help="weight of each stage's loss, layer1 to layer4 (the authors': 0.125 0.25 0.5 1); "
                          "0 leaves a stage out")
    mgd.add_argument("--mgd-schedule", help="epochs after which to re-match: 'authors' (0,1,2,3,6,9,15,26,43,74,126), 'every:N', "
                          "'none' (fixed in-order assignment: MGD without matching), or a list like 0,1,2; "
                          "0 is before training")
    mgd.add_argument("--mgd-samples", type=int, help="training images per matching update")
    mgd.add_argument("--no-mgd", dest="mgd", action="store_false", help="plain MoCo-v2 even with a teacher")

    emb = parser.add_argument_group(
        "embedding distillation", "losses on the final (MLP) embedding, from the teacher's MoCo-v2 head; each is on "
        "when its weight is positive, combines with MGD and with the others (--no-mgd: without MGD)")
    emb.add_argument("--cckd-weight", type=float,
                     help="correlation congruence (CCKD, Peng et al. ICCV 2019) over the global batch")
    emb.add_argument("--cckd-kernel", choices=KERNELS,
                     help="CCKD's kernel between L2-normalised embeddings")
    emb.add_argument("--cckd-gamma", type=float, help="CCKD's RBF gamma")
    emb.add_argument("--cckd-order", type=int, help="CCKD's Taylor order P (rbf-taylor)")
    emb.add_argument("--disco-weight", type=float,
                     help="embedding regression (DisCo, Gao et al. ECCV 2022): mean over the batch of "
                          "||q_s - q_t||^2 of normalised embeddings (DisCo's own code sums over 32 images per GPU: 32)")
    emb.add_argument("--disco-both-views", action="store_true",
                     help="DisCo on the key view too (a second forward of the student's query encoder and "
                          "of the teacher)")
    emb.add_argument("--mlp-hidden-dim", type=int,
                     help="hidden width of the student's MLP head (0: the backbone's, as MoCo-v2; DisCo: 2048)")
    emb.add_argument("--seed-weight", type=float,
                     help="similarity-distribution distillation (SEED, Fang et al. ICLR 2021)")
    emb.add_argument("--seed-queue", type=int, help="SEED's queue of teacher embeddings")
    emb.add_argument("--seed-t", type=float, help="SEED's student temperature")
    emb.add_argument("--seed-teacher-t", type=float, help="SEED's teacher temperature")
    emb.add_argument("--bingo-weight", type=float,
                     help="bag-of-instances distillation (BINGO, Xu et al. ICLR 2022): each image also brings a "
                          "member of its bag (its --bingo-k nearest neighbours in the teacher's eyes)")
    emb.add_argument("--bingo-k", type=int, help="BINGO's bag size (its released scripts: 5)")
    emb.add_argument("--bingo-t", type=float, help="BINGO's temperature (its released scripts: 0.2)")
    emb.add_argument("--bingo-queue", type=int, help="BINGO's queue of teacher embeddings")
    emb.add_argument("--bingo-pair-weights", type=float, nargs=2, metavar=("OWN", "PAIR"),
                     help="weights of a query's own and its pair's teacher embedding (BINGO's --lam)")
    emb.add_argument("--bingo-warmup-epochs", type=int,
                     help="epochs with the pair weight at 0 (BINGO: 11 of 200)")
    emb.add_argument("--bingo-mix", action=argparse.BooleanOptionalAction,
                     help="BINGO's third query, the CutMix of anchor and member (one more student forward)")
    emb.add_argument("--bingo-bags", help="a bag file of python -m moco_mgd.training.bags (default: built in "
                                          "--output-dir, bags.pt, and reused while teacher and images match)")

    run = parser.add_argument_group("run")
    run.add_argument("--output-dir", help="checkpoints, log.txt and metrics.jsonl go here")
    run.add_argument("--dataset", choices=DATASETS)
    run.add_argument("--image-size", type=int, help="crop size (e.g. 32-64 for Fashion-MNIST)")
    run.add_argument("--stem", choices=STEMS,
                     help="'small': 3x3 stride-1 conv without max-pool, for 28-64 px images (teacher too)")
    run.add_argument("--amp", choices=AMP_MODES,
                     help="autocast precision; auto = bf16 on GPU, off on CPU")
    run.add_argument("--channels-last", action=argparse.BooleanOptionalAction,
                     help="channels_last memory format (default: on GPU)")
    run.add_argument("--shuffle-bn-splits", type=int,
                     help="in a single process, the key encoder's BN runs on this many shuffled sub-batches")
    run.add_argument("--zero-init-residual", action="store_true",
                     help="each residual branch starts as zero (torchvision's option; helps a from-scratch ResNet-50 "
                          "learn in few steps)")
    run.add_argument("--embedding-bn", action="store_true",
                     help="a BN without affine parameters at the end of the MLP head (needs --mlp): removes the "
                          "batch's common direction, where a collapsed embedding lives")
    run.add_argument("--keep-checkpoints", type=int, help="keep the newest N checkpoints (0: all)")
    run.add_argument("--max-skipped-images", type=int,
                     help="stop when more unreadable images than this were skipped (per loader process)")
    run.add_argument("--max-images", type=int,
                     help="train on a random subset of this many images (0: all); for demos and quick checks")
    run.add_argument("--val-holdout", type=float, help=VAL_HOLDOUT_HELP)
    run.add_argument("--crop-min", type=float,
                     help="the smallest random crop, as a fraction of the image's area (MoCo v2: 0.2; MoCo v3's flag)")
    run.add_argument("--knn-freq", type=int,
                     help="every N epochs, kNN top-1 of the student on the labelled train/val split (val/ "
                          "for image folders, the test set for fashion-mnist); 0: off. The teacher is "
                          "evaluated once at the start as a reference")
    run.add_argument("--knn-k", type=int, help="neighbours of the kNN monitor (DINO: 20)")
    run.add_argument("--knn-t", type=float, help="temperature of the kNN vote (DINO: 0.07)")
    run.add_argument("--wandb-project", help="also log to this wandb project")
    return launch.set_config_defaults(parser, PretrainConfig)


def main(argv: list[str] | None = None) -> None:
    launch.run_main(get_args_parser(), argv, PretrainConfig, validate, pretrain, "main_moco_mgd.py")


if __name__ == "__main__":
    sys.exit(main())
