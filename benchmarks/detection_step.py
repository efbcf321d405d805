"""What a COCO distillation step costs: the paper's three detector pairs at COCO's image size, one DKD step
(the student's training forward and backward, the teacher's backbone and head on the student's proposals),
timed on this machine, and the projection to the 1x schedule.

The images are generated (COCO's typical 640x480, resized by the detectors to the recipe's 800 short side);
the weights are random (the cost does not depend on them). Each pair runs `--steps` steps after one warm-up
step; the table gives the median seconds per image and the projection to 12 epochs of train2017 (117,266
images with boxes) at that speed.

    python benchmarks/detection_step.py --out /tmp/detection_step
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.tables import markdown_table
from dkd_tune.core.recipes import resolve_recipe
from dkd_tune.engine.detection_loop import StudentForward, detection_step
from dkd_tune.models.detection import create_detector

PAIRS = (
    ("frcnn_r101_fpn", "frcnn_r18_fpn"),
    ("frcnn_r101_fpn", "frcnn_r50_fpn"),
    ("frcnn_r50_fpn", "frcnn_mv2_fpn"),
)
COCO_TRAIN_IMAGES = 117_266  # train2017 images with at least one box
EPOCHS = 12


def images_and_targets(count: int, generator: torch.Generator):
    images = [torch.rand(3, 480, 640, generator=generator) for _ in range(count)]
    targets = []
    for _ in range(count):
        corners = torch.rand(7, 2, generator=generator) * torch.tensor([560.0, 400.0])
        sizes = 20 + torch.rand(7, 2, generator=generator) * 60
        boxes = torch.cat([corners, corners + sizes], dim=1)
        targets.append({"boxes": boxes, "labels": torch.randint(1, 81, (7,), generator=generator)})
    return images, targets


def time_pair(teacher_name: str, student_name: str, steps: int, batch: int) -> dict:
    torch.manual_seed(0)
    teacher = create_detector(teacher_name, 81).eval().requires_grad_(False)
    student = StudentForward(create_detector(student_name, 81).train())
    optimizer = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
    recipe = resolve_recipe("coco-1x")
    generator = torch.Generator().manual_seed(0)
    seconds = []
    for step in range(steps + 1):
        images, targets = images_and_targets(batch, generator)
        started = time.perf_counter()
        loss, _ = detection_step(student, teacher, images, targets, "dkd", recipe, 1.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step:  # the first step warms caches and allocators
            seconds.append((time.perf_counter() - started) / batch)
    per_image = statistics.median(seconds)
    return {
        "teacher -> student": f"{teacher_name} -> {student_name}",
        "s per image (median)": per_image,
        "steps": steps,
        "12 epochs of train2017 at this speed (days)": per_image * COCO_TRAIN_IMAGES * EPOCHS / 86400,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    rows = [time_pair(teacher, student, args.steps, args.batch) for teacher, student in PAIRS]
    import pandas as pd

    text = (
        f"`python benchmarks/detection_step.py --steps {args.steps} --batch {args.batch}` on {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}, "
        f"{time.time() - started:.0f} s\n\n" + markdown_table(pd.DataFrame(rows))
    )
    (args.out / "detection_step.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
