"""MoCo-v2 teacher, MoCo-v2 baseline and MGD students on Fashion-MNIST, evaluated the same way.

Every run is a real ``main_moco_mgd.py`` / ``main_lincls.py`` process, exactly what a user
would type. The teacher (plain MoCo-v2, ``--teacher-arch``) is trained once, with the first
seed, and distils every student, as the paper distils every student from one checkpoint.
Each student method runs once per seed. Every run is evaluated twice: kNN top-1 on the test
set at the end of pretraining, then MoCo's linear protocol on cached features; so is the
student with random weights, the floor any pretraining must beat (on Fashion-MNIST a high one). The table
(mean ± std over seeds) is printed and written to ``OUTPUT/results.md`` and ``results.json``;
the figures of the first seed's MGD run go to ``OUTPUT/figures``.

An interrupted experiment resumes: a run whose ``result.json`` exists is not redone, and an
unfinished pretraining resumes from its last checkpoint.

    python experiments/fashion_mnist.py --epochs 10 --images 16384 --seeds 0 1 2
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from moco_mgd.checkpoints.files import file_sha256
from moco_mgd.losses.mgd_distiller import DEFAULT_STAGE_WEIGHTS
from moco_mgd.reporting import plots
from moco_mgd.data import FASHION_MNIST_DIR, VAL_HOLDOUT_HELP, evaluated_on, find_fashion_mnist
from moco_mgd.reporting.results import read_result, results_table, run_result, summary_line, write_result
from supervised_teacher import TEACHER_FILE

REPO = Path(__file__).resolve().parents[1]

# The teacher kinds, by how they are named in the table. All but moco are saved as a plain
# torchvision state dict (TEACHER_FILE) with a classifier where MoCo-v2 has its embedding head.
TEACHER_KINDS = {"moco": "MoCo-v2", "supervised": "supervised", "random": "random-weight",
                 "random-bn": "random-weight (BN re-estimated)"}

# Student methods. A "+" combines an MGD variant with embedding losses; an embedding loss
# alone runs with --no-mgd. Their flags: method_flags().
MGD_VARIANTS: dict[str, list[str]] = {
    "mgd-amp": ["--mgd-reducer", "amp"],
    "mgd-rd": ["--mgd-reducer", "rd"],
    "mgd-sm": ["--mgd-reducer", "sm"],
    "mgd-amp-nomatch": ["--mgd-reducer", "amp", "--mgd-schedule", "none"],
}
EMBEDDING_METHODS = ("cckd", "disco", "seed", "bingo")
METHODS = ("baseline", *MGD_VARIANTS, *EMBEDDING_METHODS, *(f"mgd-amp+{e}" for e in EMBEDDING_METHODS))
TITLES = {"teacher": "teacher ({teacher_kind} {teacher})", "baseline": "baseline (MoCo-v2 {student})",
          "mgd-amp": "MGD-AMP", "mgd-rd": "MGD-RD", "mgd-sm": "MGD-SM",
          "mgd-amp-nomatch": "MGD-AMP without matching", "cckd": "CCKD", "disco": "DisCo", "seed": "SEED",
          "bingo": "BINGO", "mgd-amp+cckd": "MGD-AMP + CCKD", "mgd-amp+disco": "MGD-AMP + DisCo",
          "mgd-amp+seed": "MGD-AMP + SEED", "mgd-amp+bingo": "MGD-AMP + BINGO",
          "random": "random init {student}"}


def method_flags(method: str, args: argparse.Namespace) -> list[str] | None:
    """The pretraining flags ``method`` adds to the teacher's; None for the baseline (no teacher)."""
    if method == "baseline":
        return None
    parts = method.split("+")
    mgd = [part for part in parts if part in MGD_VARIANTS]
    flags = list(MGD_VARIANTS[mgd[0]]) if mgd else ["--no-mgd"]
    if "cckd" in parts:
        flags += ["--cckd-weight", str(args.cckd_weight)]
    if "disco" in parts:
        flags += ["--disco-weight", str(args.disco_weight)] + (["--disco-both-views"] if args.disco_both_views else []) \
            + (["--mlp-hidden-dim", str(args.disco_hidden_dim)] if args.disco_hidden_dim else [])
    if "seed" in parts:
        flags += ["--seed-weight", str(args.seed_weight), "--seed-queue", str(args.seed_queue or args.moco_k)]
    if "bingo" in parts:
        flags += ["--bingo-weight", str(args.bingo_weight), "--bingo-k", str(args.bingo_k),
                  "--bingo-queue", str(args.moco_k), "--bingo-warmup-epochs", str(bingo_warmup_epochs(args))]
    return flags


def bingo_warmup_epochs(args: argparse.Namespace) -> int:
    """BINGO's released scripts keep the pair weight at 0 for 11 of 200 epochs: the same share of these."""
    return args.bingo_warmup_epochs if args.bingo_warmup_epochs is not None else round(args.epochs * 11 / 200)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="output/fashion_mnist")
    parser.add_argument("--data", default="", help=f"directory of the IDX files (default {FASHION_MNIST_DIR}, "
                                                     "Debian's dataset-fashion-mnist; the demo script installs it if missing)")
    parser.add_argument("--download", action="store_true",
                        help="if the data is missing and cannot be installed with apt, let torchvision download it "
                             "into OUTPUT/data (network access)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS[:5]), choices=list(METHODS),
                        help="student methods (default: the MGD study; add cckd disco seed and mgd-amp+cckd ... for "
                             "the embedding losses)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=5, help="pretraining epochs of every run")
    parser.add_argument("--teacher-epochs", type=int, default=0, help="the teacher's (default: --epochs)")
    parser.add_argument("--images", type=int, default=8192, help="training images (a random subset; 60000: all)")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--val-holdout", type=float, default=0.0, help=VAL_HOLDOUT_HELP)
    parser.add_argument("--stem", default="imagenet", choices=["imagenet", "small"])
    parser.add_argument("--student-arch", default="resnet18")
    parser.add_argument("--teacher-arch", default="resnet50")
    parser.add_argument("-b", "--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.0,
                        help="pretraining lr (default: MoCo's 0.03 per 256 images, scaled linearly to -b: 0.0075 for "
                             "64; 8x that, as MoCo's CIFAR demo, made ResNet-18 worse with training here)")
    parser.add_argument("--moco-k", type=int, default=4096)
    parser.add_argument("--moco-t", type=float, default=0.2, help="MoCo-v2's temperature")
    parser.add_argument("--crop-min", type=float, default=0.2,
                        help="the smallest random crop of pretraining, as a fraction of the image (MoCo v2: 0.2)")
    parser.add_argument("--moco-m", type=float, default=0.99,
                        help="0.99, not MoCo's 0.999: a few hundred steps would leave the key encoder half at init")
    parser.add_argument("--shuffle-bn-splits", type=int, default=8,
                        help="BN groups of the key batch in one process (main_moco_mgd.py's flag)")
    parser.add_argument("--mgd-schedule", default="every:1")
    parser.add_argument("--mgd-samples", type=int, default=2048)
    parser.add_argument("--mgd-loss-factor", type=float, default=1e4)
    parser.add_argument("--mgd-stage-weights", nargs=4, type=float, default=list(DEFAULT_STAGE_WEIGHTS), metavar="W",
                        help="each stage's MGD weight, layer1 to layer4 (0: left out; e.g. 0.125 0.25 0.5 0 "
                             "without layer4, whose maps are 1x1 at 32 px)")
    parser.add_argument("--cckd-weight", type=float, default=20.0,
                        help="CCKD was proposed for supervised distillation and gives no self-supervised weight: 20 "
                             "gives its gradient on the student embedding the size of InfoNCE's at initialisation "
                             "(measured on Fashion-MNIST: 0.19 vs 0.18 per batch of 64; at 1 it is 0.0096)")
    parser.add_argument("--disco-weight", type=float, default=32.0,
                        help="on the batch mean: DisCo's released code sums over each GPU's 32 images with weight 1")
    parser.add_argument("--disco-both-views", action="store_true", help="DisCo on the key view too")
    parser.add_argument("--disco-hidden-dim", type=int, default=0, help="DisCo's wider student MLP (DisCo: 2048)")
    parser.add_argument("--seed-weight", type=float, default=1.0,
                        help="SEED's loss alone in its paper; at 1 its gradient is InfoNCE's size at initialisation")
    parser.add_argument("--seed-queue", type=int, default=0, help="SEED's queue (default: --moco-k)")
    parser.add_argument("--bingo-weight", type=float, default=1.0,
                        help="BINGO's loss alone in its paper; here added to InfoNCE (its queue: --moco-k)")
    parser.add_argument("--bingo-k", type=int, default=5, help="BINGO's bag size (its released scripts: 5)")
    parser.add_argument("--bingo-warmup-epochs", type=int, default=None,
                        help="default: 11/200 of --epochs, BINGO's share")
    parser.add_argument("--knn-freq", type=int, default=0, help="kNN every N epochs (default: at the end only)")
    parser.add_argument("--knn-k", type=int, default=20)
    parser.add_argument("--knn-t", type=float, default=0.07)
    parser.add_argument("--lincls-epochs", type=int, default=100, help="MoCo's 100, lr 30, drops at 60 and 80")
    parser.add_argument("-j", "--workers", type=int, default=2)
    parser.add_argument("--print-freq", type=int, default=50)
    parser.add_argument("--python", default=sys.executable, help="interpreter of the runs")
    parser.add_argument("--teacher-kind", default=None, choices=list(TEACHER_KINDS),
                        help="moco: a MoCo-v2 teacher trained without labels; supervised: the positive control, "
                             "trained with labels on the same images (experiments/supervised_teacher.py); random "
                             "and random-bn: the negative controls, a random-weight network as initialised or with "
                             "its BN statistics re-estimated on the training images (experiments/random_teacher.py). "
                             "Default: the kind of the teacher already in the output directory (or --teacher-from), "
                             "else moco")
    parser.add_argument("--teacher-lr", type=float, default=2e-3, help="AdamW lr of the supervised teacher")
    parser.add_argument("--teacher-from", default="",
                        help="an earlier experiment's output directory: distil from its finished teacher instead "
                             "of training one (ablations of the students alone)")
    parser.add_argument("--teacher-checkpoint", default="",
                        help="a MoCo-v2 --teacher-arch checkpoint trained elsewhere (main_moco_mgd.py's or the "
                             "official MoCo's layout, e.g. a longer run with other flags): the teacher of every "
                             "student, evaluated as the teacher row, instead of training one")
    parser.add_argument("--baseline-from", default="",
                        help="an earlier experiment's output directory with the same student settings: its "
                             "baseline and random-weight runs are this table's (paired by seed), none is trained "
                             "here; for studies of several teachers against one baseline")
    parser.add_argument("--no-random-init", dest="random_init", action="store_false",
                        help="skip the random-weights row (e.g. in an ablation whose main experiment has it)")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: the table and figures of the runs finished so far (e.g. by parallel jobs)")
    return parser


def check_args(args: argparse.Namespace) -> None:
    if not args.lr:
        args.lr = 0.03 * args.batch_size / 256
    for name in ("epochs", "images", "image_size", "batch_size", "lincls_epochs"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")
    if args.images < args.batch_size:
        raise SystemExit(f"--images {args.images} is smaller than one batch (-b {args.batch_size})")
    if args.moco_k % args.batch_size:
        raise SystemExit(f"--moco-k {args.moco_k} must be a multiple of -b {args.batch_size}")
    if args.seed_queue % args.batch_size:
        raise SystemExit(f"--seed-queue {args.seed_queue} must be a multiple of -b {args.batch_size}")
    if args.val_holdout and not 0 < args.val_holdout < 1:
        raise SystemExit(f"--val-holdout {args.val_holdout}: must be > 0 and < 1 (0: score the test set)")
    if len(set(args.seeds)) != len(args.seeds):
        raise SystemExit(f"--seeds {args.seeds} repeats a seed")
    if args.teacher_checkpoint:
        if args.teacher_from:
            raise SystemExit("--teacher-checkpoint and --teacher-from both name the teacher: give one")
        if args.teacher_kind == "supervised":
            raise SystemExit("--teacher-checkpoint is a MoCo-v2 teacher; a supervised one is trained by "
                             "--teacher-kind supervised")
        if not os.path.isfile(args.teacher_checkpoint):
            raise SystemExit(f"--teacher-checkpoint {args.teacher_checkpoint}: no such file")


def fashion_mnist_dir(args: argparse.Namespace) -> str:
    """Where the IDX files are; downloads them with --download. Installing Debian's package is the
    demo script's job (scripts/demo_fashion_mnist.sh), not this one's."""
    if args.data:
        try:
            return find_fashion_mnist(args.data)
        except FileNotFoundError as exc:
            raise SystemExit(f"--data: {exc}") from None
    try:
        return find_fashion_mnist()
    except FileNotFoundError:
        pass
    if not args.download:
        raise SystemExit(f"Fashion-MNIST is not in {FASHION_MNIST_DIR}: install Debian's dataset-fashion-mnist "
                         "(apt-get install dataset-fashion-mnist), pass --data DIR with the IDX files, or allow a "
                         "download with --download")
    from torchvision.datasets import FashionMNIST

    root = Path(args.output_dir) / "data"
    print(f"downloading Fashion-MNIST with torchvision into {root} (--download)", flush=True)
    FashionMNIST(str(root), train=True, download=True)
    FashionMNIST(str(root), train=False, download=True)
    return find_fashion_mnist(str(root / "FashionMNIST" / "raw"))


def run_command(command: list[str], log_path: Path) -> float:
    """Run one stage as its own process, output appended to ``log_path``; its wall time in seconds."""
    print("  $ " + " ".join(command), flush=True)
    start = time.perf_counter()
    with open(log_path, "a") as log:
        log.write("$ " + " ".join(command) + "\n")   # what --report-only points to for a run's settings
        log.flush()
        returncode = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT).returncode
    if returncode != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-15:])
        raise SystemExit(f"{command[1]} failed (exit {returncode}); the end of {log_path}:\n{tail}")
    return time.perf_counter() - start


def common_flags(args: argparse.Namespace, data: str, seed: int) -> list[str]:
    """The flags every command of a run shares: the data, its size and split, the seed."""
    flags = [data, "--dataset", "fashion-mnist", "--image-size", str(args.image_size), "--stem", args.stem,
             "-j", str(args.workers), "--seed", str(seed)]
    return flags + (["--val-holdout", str(args.val_holdout)] if args.val_holdout else [])


def lincls_flags(args: argparse.Namespace) -> list[str]:
    """MoCo's linear protocol (lr 30, x0.1 at 60% and 80% of the epochs) on cached features."""
    return ["--cached-features", "--epochs", str(args.lincls_epochs), "--schedule", str(args.lincls_epochs * 6 // 10),
            str(args.lincls_epochs * 8 // 10), "-p", "1000"]


def last_checkpoint(run_dir: Path, epochs: int) -> Path:
    return run_dir / f"checkpoint_{epochs - 1:04d}.pth.tar"


def finished_before(run_dir: Path, title: str) -> dict | None:
    """The run's result if an earlier invocation finished it; else None, and its directory is made."""
    if (done := read_result(run_dir)) is not None:
        print(f"== {title}: done before ({run_dir / 'result.json'})", flush=True)
        return done
    print(f"== {title} -> {run_dir}", flush=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    return None


def pretrain_and_evaluate(args, data: str, method: str, seed: int, run_dir: Path, arch: str, epochs: int,
                          extra: list[str]) -> dict:
    """Pretrain one run (unless its result exists), evaluate it, record its result."""
    if (done := finished_before(run_dir, f"{method} seed {seed}")) is not None:
        return done
    common = common_flags(args, data, seed)
    # One checkpoint kept per run: the evaluation reads the last, a resumed run needs only the newest,
    # and a study's dozens of runs would otherwise keep every epoch's (130 MB each for a ResNet-18).
    pretrain = [args.python, "main_moco_mgd.py", *common, "-a", arch, "--epochs", str(epochs),
                "-b", str(args.batch_size), "--lr", str(args.lr), "--moco-k", str(args.moco_k), "--moco-t",
                str(args.moco_t), "--moco-m", str(args.moco_m), "--crop-min", str(args.crop_min), "--mlp",
                "--aug-plus", "--cos", "--max-images", str(args.images), "-p", str(args.print_freq),
                "--shuffle-bn-splits", str(args.shuffle_bn_splits),
                "--knn-freq", str(args.knn_freq or epochs), "--knn-k", str(args.knn_k), "--knn-t", str(args.knn_t),
                "--output-dir", str(run_dir), "--keep-checkpoints", "1", *extra]
    pretrain_seconds = run_command(pretrain, run_dir / "stdout.txt")
    return linear_evaluation(args, data, method, seed, run_dir, arch, epochs, last_checkpoint(run_dir, epochs),
                             pretrain_seconds)


def linear_evaluation(args, data: str, method: str, seed: int, run_dir: Path, arch: str, epochs: int,
                      weights: Path | None, pretrain_seconds: float, knn_here: bool = False,
                      teacher_kind: str = "moco") -> dict:
    """MoCo's linear protocol on ``weights`` (None: random), then the run's result.

    A pretraining run's kNN is already in its log; ``knn_here`` scores it on the linear
    evaluation's cached features instead (the same protocol, without a second feature pass).
    """
    common = common_flags(args, data, seed)
    lincls_dir = run_dir / "lincls"
    lincls_dir.mkdir(exist_ok=True)
    for stale in ("metrics.jsonl", "checkpoint.pth.tar", "model_best.pth.tar"):  # a half-done eval restarts
        (lincls_dir / stale).unlink(missing_ok=True)
    lincls = [args.python, "main_lincls.py", *common, "-a", arch, *(["--pretrained", str(weights)] if weights else []),
              "--max-images", str(args.images), "--output-dir", str(lincls_dir), *lincls_flags(args)]
    if knn_here:
        lincls += ["--knn-k", str(args.knn_k), "--knn-t", str(args.knn_t)]
    eval_seconds = run_command(lincls, lincls_dir / "stdout.txt")
    result = run_result(lincls_dir if knn_here else run_dir, lincls_dir, method=method, seed=seed, arch=arch, epochs=epochs,
                        pretrain_seconds=pretrain_seconds, eval_seconds=eval_seconds)
    result.update(val_holdout=args.val_holdout, evaluated_on=evaluated_on(args.val_holdout))
    if method == "teacher":
        result["teacher_kind"] = teacher_kind
    write_result(run_dir, result)
    print(f"   kNN top-1 {result['knn_top1']:.2f}, linear top-1 {result['linear_top1']:.2f}, "
          f"{pretrain_seconds:.0f} s + {eval_seconds:.0f} s", flush=True)
    return result


def train_supervised_teacher(args, data: str, seed: int, run_dir: Path, epochs: int) -> dict:
    """The positive control: a teacher trained with labels on the students' images, then evaluated as they are."""
    if (done := finished_before(run_dir, "supervised teacher")) is not None:
        return done
    common = [*common_flags(args, data, seed), "-a", args.teacher_arch, "--max-images", str(args.images)]
    seconds = run_command([args.python, "experiments/supervised_teacher.py", *common, "--epochs", str(epochs),
                           "-b", str(args.batch_size), "--lr", str(args.teacher_lr), "-p", str(args.print_freq),
                           "--output-dir", str(run_dir)], run_dir / "stdout.txt")
    return linear_evaluation(args, data, "teacher", seed, run_dir, args.teacher_arch, epochs, run_dir / TEACHER_FILE,
                             seconds, knn_here=True, teacher_kind="supervised")


def make_random_teacher(args, data: str, seed: int, run_dir: Path, kind: str) -> dict:
    """The negative control: a random-weight teacher (its BN re-estimated for random-bn), evaluated as the others."""
    if (done := finished_before(run_dir, f"{kind} teacher")) is not None:
        return done
    command = [args.python, "experiments/random_teacher.py", *common_flags(args, data, seed), "-a", args.teacher_arch,
               "--max-images", str(args.images), "-b", str(args.batch_size), "--output-dir", str(run_dir)]
    seconds = run_command(command + (["--recalibrate-bn"] if kind == "random-bn" else []), run_dir / "stdout.txt")
    return linear_evaluation(args, data, "teacher", seed, run_dir, args.teacher_arch, 0, run_dir / TEACHER_FILE,
                             seconds, knn_here=True, teacher_kind=kind)


def adopted_teacher_epochs(path: str) -> int:
    """The epochs a MoCo-layout checkpoint was trained for (its ``epoch``: the next one to run)."""
    from moco_mgd.checkpoints.formats import load_checkpoint_file

    checkpoint = load_checkpoint_file(path, "--teacher-checkpoint")
    epoch = checkpoint.get("epoch") if isinstance(checkpoint, dict) else None
    if not isinstance(epoch, int):
        raise SystemExit(f"--teacher-checkpoint {path}: no 'epoch' in it, so not a MoCo-layout pretraining "
                         "checkpoint (a torchvision state dict is a supervised teacher: --teacher-kind supervised)")
    return epoch


def check_adopted_teacher(teacher_dir: Path, trained: dict | None, path: str) -> None:
    """One output directory, one teacher (``trained``: its result so far): refuse to mix students of
    different teachers in one table."""
    if not os.path.isfile(path):  # only when reused from the directory: the flag itself was checked
        raise SystemExit(f"the teacher of {teacher_dir} is {path}, which is gone: restore it, or use another "
                         "--output-dir")
    if trained is None:
        return
    if trained.get("teacher_checkpoint") != path:
        was = trained.get("teacher_checkpoint") or "trained here"
        raise SystemExit(f"--teacher-checkpoint {path}: {teacher_dir} already holds another teacher ({was}); use "
                         "another --output-dir")
    if trained.get("teacher_sha256") != file_sha256(path):
        raise SystemExit(f"--teacher-checkpoint {path} changed since its evaluation in {teacher_dir} (sha256 "
                         "differs); the students so far were distilled from the old file: use another --output-dir")


def evaluate_adopted_teacher(args, data: str, seed: int, run_dir: Path, epochs: int, path: str) -> dict:
    """A MoCo-v2 teacher trained elsewhere, evaluated as a student is: kNN, then the linear protocol."""
    if (done := finished_before(run_dir, f"teacher {path} ({epochs} epochs)")) is not None:
        return done
    result = linear_evaluation(args, data, "teacher", seed, run_dir, args.teacher_arch, epochs,
                               Path(path), 0.0, knn_here=True)
    result.update(teacher_checkpoint=path, teacher_sha256=file_sha256(path))
    write_result(run_dir, result)
    return result


def evaluate_random_init(args, data: str, seed: int, run_dir: Path) -> dict:
    """The floor every pretraining must beat: the student architecture with random weights."""
    if (done := finished_before(run_dir, f"random init seed {seed}")) is not None:
        return done
    # main_lincls.py without --pretrained: the backbone of torch.manual_seed(seed), kNN on its features.
    return linear_evaluation(args, data, "random", seed, run_dir, args.student_arch, 0, None, 0.0, knn_here=True)


@dataclass(frozen=True)
class Teacher:
    """The teacher of an output directory, as resolved from the flags and what is already on disk."""

    directory: Path          # where its result.json is (another experiment's with --teacher-from)
    kind: str                # a key of TEACHER_KINDS
    epochs: int
    adopted: str = ""        # --teacher-checkpoint: a file trained elsewhere, evaluated as the teacher row

    @property
    def weights(self) -> Path:
        """What the students' --teacher-checkpoint is."""
        if self.adopted:
            return Path(self.adopted)
        return last_checkpoint(self.directory, self.epochs) if self.kind == "moco" else self.directory / TEACHER_FILE


def resolve_teacher(args: argparse.Namespace, output: Path) -> Teacher:
    """The one teacher of ``output``: from --teacher-from, --teacher-checkpoint, the teacher already
    recorded there, or the flags that train one. Refuses a mix of teachers in one directory."""
    directory = Path(args.teacher_from) / "teacher" if args.teacher_from else output / "teacher"
    recorded = read_result(directory)
    if args.teacher_from and recorded is None:
        raise SystemExit(f"--teacher-from {args.teacher_from}: no finished teacher there ({directory / 'result.json'} "
                         "is missing); run that experiment first, or drop --teacher-from")
    epochs = recorded["epochs"] if args.teacher_from else args.teacher_epochs or args.epochs
    adopted = os.path.abspath(args.teacher_checkpoint) if args.teacher_checkpoint else \
        (recorded or {}).get("teacher_checkpoint", "")   # more seeds of a teacher adopted before: no flag needed
    if adopted:
        check_adopted_teacher(directory, recorded, adopted)
        # Read from the checkpoint (a few hundred MB) only until its evaluation has recorded it.
        epochs = recorded["epochs"] if recorded is not None else adopted_teacher_epochs(adopted)
    kind = args.teacher_kind
    if recorded is not None:  # a teacher already trained is of the kind it was trained as
        if kind not in (None, recorded.get("teacher_kind", "moco")):
            raise SystemExit(f"--teacher-kind {kind}: the teacher in {directory} is "
                             f"{recorded.get('teacher_kind', 'moco')}; drop the flag, or use another --output-dir")
        kind = recorded.get("teacher_kind", "moco")
    kind = "moco" if adopted else kind or "moco"
    if kind != "moco" and any(m in EMBEDDING_METHODS or "+" in m for m in args.methods):
        raise SystemExit(f"the embedding losses distil a MoCo-v2 head's embedding, and a {kind} teacher "
                         "has a classifier there: use --teacher-kind moco for cckd/disco/seed")
    return Teacher(directory, kind, epochs, adopted)


@dataclass(frozen=True)
class Run:
    """One row's run of the plan: its directory (result.json marks it done) and what makes it."""

    directory: Path
    make: Callable[[], dict]


def teacher_run(args: argparse.Namespace, data: str, teacher: Teacher) -> Run:
    seed, directory = args.seeds[0], teacher.directory
    if teacher.adopted:
        make = partial(evaluate_adopted_teacher, args, data, seed, directory, teacher.epochs, teacher.adopted)
    elif teacher.kind == "supervised":
        make = partial(train_supervised_teacher, args, data, seed, directory, teacher.epochs)
    elif teacher.kind in ("random", "random-bn"):
        make = partial(make_random_teacher, args, data, seed, directory, teacher.kind)
    else:
        make = partial(pretrain_and_evaluate, args, data, "teacher", seed, directory, args.teacher_arch,
                       teacher.epochs, [])
    return Run(directory, make)


def plan_runs(args: argparse.Namespace, data: str, output: Path, shared: Path, methods: list[str],
              teacher: Teacher) -> list[Run]:
    """The teacher first (when a student needs it or it exists), then seed by seed every method and the
    random-weight row. The baseline and random rows live in ``shared`` (--baseline-from, else ``output``)."""
    teacher_flags = ["--teacher-arch", args.teacher_arch, "--teacher-checkpoint", str(teacher.weights),
                     "--mgd-schedule", args.mgd_schedule, "--mgd-samples", str(args.mgd_samples),
                     "--mgd-loss-factor", str(args.mgd_loss_factor),
                     "--mgd-stage-weights", *map(str, args.mgd_stage_weights)]
    plan = []
    if any(method_flags(m, args) is not None for m in methods) or read_result(teacher.directory) is not None:
        plan.append(teacher_run(args, data, teacher))
    for seed in args.seeds:
        for method in methods:
            directory = (shared if method == "baseline" else output) / f"seed{seed}" / method
            flags = method_flags(method, args)
            plan.append(Run(directory, partial(pretrain_and_evaluate, args, data, method, seed, directory,
                                               args.student_arch, args.epochs,
                                               [] if flags is None else teacher_flags + flags)))
        if args.random_init:
            directory = shared / f"seed{seed}" / "random"
            plan.append(Run(directory, partial(evaluate_random_init, args, data, seed, directory)))
    return plan


def write_report(args: argparse.Namespace, output: Path, shared: Path, methods: list[str], teacher: Teacher,
                 results: list[dict]) -> str:
    """The table, the one-line summary and the figures of the first seed's MGD-AMP run; returns the text."""
    kind = TEACHER_KINDS[teacher.kind]
    titles = {m: t.format(teacher=args.teacher_arch, student=args.student_arch, teacher_kind=kind)
              for m, t in TITLES.items()}
    table = results_table(results, ["teacher", *methods, "random"], titles)
    if args.report_only:
        # This invocation's flags need not be the ones the runs were trained with (defaults, most of them).
        settings = (f"Assembled by --report-only from the runs' result.json files (seeds "
                    f"{' '.join(map(str, args.seeds))}); each run's settings are its command lines, the lines "
                    f"starting with $ in its stdout.txt. kNN and linear top-1 on {scored_on(args)}")
    else:
        settings = run_settings(args, teacher)
    student = next((m for m in methods if m != "baseline"), "baseline")
    summary = summary_line(results, student, {**titles, "teacher": f"{kind} {args.teacher_arch} teacher"})
    text = settings + "\n\n" + table + "\n" + summary + "\n"
    (output / "results.md").write_text(text)
    recorded_args = {**vars(args), "teacher_kind": teacher.kind, "teacher_checkpoint": teacher.adopted}
    (output / "results.json").write_text(json.dumps({"args": recorded_args, "results": results}, indent=1) + "\n")
    first = f"seed{args.seeds[0]}"
    figure_run, baseline_run, random_run = output / first / "mgd-amp", shared / first / "baseline", shared / first / "random"
    if (figure_run / "metrics.jsonl").is_file():
        compare = {"baseline": baseline_run} if (baseline_run / "metrics.jsonl").is_file() else {}
        references = {"random init": random_run} if (random_run / "metrics.jsonl").is_file() else {}
        plots.write_run_figures(figure_run, output / "figures", label="MGD-AMP", compare=compare, references=references)
    return text


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    check_args(args)
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    data = "" if args.report_only else fashion_mnist_dir(args)
    start = time.perf_counter()
    teacher = resolve_teacher(args, output)
    shared = Path(args.baseline_from) if args.baseline_from else output
    # Borrowed baselines are rows of the table, as the ones trained here are.
    methods = ["baseline", *args.methods] if args.baseline_from and "baseline" not in args.methods else args.methods
    plan = plan_runs(args, data, output, shared, methods, teacher)
    unfinished = [str(run.directory) for run in plan
                  if args.baseline_from and run.directory.is_relative_to(shared) and read_result(run.directory) is None]
    if unfinished and not args.report_only:
        raise SystemExit(f"--baseline-from {args.baseline_from}: {', '.join(unfinished)} not finished; run that "
                         "experiment's baseline (and random) seeds first")
    if args.report_only:
        results = [r for r in (read_result(run.directory) for run in plan) if r is not None]
    else:
        results = [run.make() for run in plan]
    text = write_report(args, output, shared, methods, teacher, results)
    print(f"\n{text}written to {output / 'results.md'} in {time.perf_counter() - start:.0f} s", flush=True)


def scored_on(args: argparse.Namespace) -> str:
    if args.val_holdout:
        return (f"the held-out validation images ({args.val_holdout:g} of the training set, stratified; never the "
                "test set)")
    return "the 10,000 test images"


def run_settings(args: argparse.Namespace, teacher: Teacher) -> str:
    """The sentence above the table: the settings this invocation trained its runs with."""
    # A baseline-only invocation trains no teacher and no matching: naming their settings would mislead.
    distilled = any(m != "baseline" for m in args.methods)
    teacher_text = (f" ({TEACHER_KINDS[teacher.kind]} teacher {teacher.epochs}"
                    f"{f', lr {args.teacher_lr:g}' if teacher.kind == 'supervised' else ''})") if distilled else ""
    mgd_text = (f" MGD matching {args.mgd_schedule} on {args.mgd_samples} images, MGD loss factor "
                f"{args.mgd_loss_factor:g}, stage weights {' '.join(f'{w:g}' for w in args.mgd_stage_weights)},"
                if distilled else "")
    settings = (f"Fashion-MNIST, {args.images} training images at {args.image_size} px ({args.stem} stem), "
                f"{args.epochs} pretraining epochs{teacher_text}, -b {args.batch_size} --lr {args.lr:g}, "
                f"--moco-t {args.moco_t} --moco-m {args.moco_m} --crop-min {args.crop_min:g} "
                f"--shuffle-bn-splits {args.shuffle_bn_splits},{mgd_text} seeds {' '.join(map(str, args.seeds))}; "
                f"kNN (k={args.knn_k}, T={args.knn_t}) and linear top-1 ({args.lincls_epochs} epochs, cached "
                f"features) on {scored_on(args)}")
    if any("+" in m or m in EMBEDDING_METHODS for m in args.methods):
        settings += (f"; embedding losses: CCKD weight {args.cckd_weight} (rbf-taylor, P=2, gamma 0.4), DisCo "
                     f"weight {args.disco_weight} ({'both views' if args.disco_both_views else 'query view'}"
                     f"{f', MLP hidden {args.disco_hidden_dim}' if args.disco_hidden_dim else ''}), SEED weight "
                     f"{args.seed_weight} (queue {args.seed_queue or args.moco_k}, T 0.2 / 1e-4), BINGO weight "
                     f"{args.bingo_weight} (bags of {args.bingo_k}, queue {args.moco_k}, T 0.2, pair weights 0.5 / "
                     f"0.5 after {bingo_warmup_epochs(args)} epoch(s), with the CutMix view)")
    return settings


if __name__ == "__main__":
    main()
