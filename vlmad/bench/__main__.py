"""``make bench``: speed figures on this machine (random weights, real architectures, CPU by default).

Sections: ``winclip`` (ViT-B-16-plus-240, batch 1 and 8, zero-shot and 1-shot vs a bare encode_image),
``anomalyclip`` (ViT-L-14-336-quickgelu at 336 and 518 px vs a bare encode_image), ``training``
(AnomalyCLIP's 15-epoch fit at 518 px on a small generated auxiliary set: the default feature cache against the
uncached path, bf16 against fp32 storage), ``calibration`` (OK/NG threshold calibration seconds / evaluation
seconds, old and current default; the images each rule scores on MVTec-AD and VisA),
``sweep`` (a WinCLIP k-shot x reference-draw sweep without cache, with a cold and a warm disk cache),
``musc`` (ViT-L-14-336 at 518 px: encode and mutual-scoring time of a 5-image category on CPU, of a 200-image
category in bf16 on a GPU, peak memory, scoring FLOP/s against a plain matmul of the same block), ``pipeline``
(images/s of decoding + resizing + normalising at 518 px through the real dataset and DataLoader, beside the
model's images/s), ``serve`` (vlmad serve on loopback: latency, throughput / offline at 1, 8, 32 clients,
a worker SIGKILLed and SIGTERM mid-load, vlmad.bench.serve), ``int8`` (INT8 / fp32 OpenVINO speed per method),
``export`` (each method at its paper backbone: CPU images/s in torch, ONNX Runtime and
OpenVINO side by side, vlmad.bench.export), ``dino_fewshot`` (AnomalyDINO at 448 px on ViT-S/14, SubspaceAD at
672 px on ViT-g/14-reg4: s/image against the bare DINOv2 pass, and the reference set-up (views, PCA / memory bank)
for k = 1, 2, 4; on a CPU ViT-g runs with 1 reference and 2 rotations per pass, the rest as the paper),
``visualad`` (ViT-L-14-336-quickgelu at 518 px: s/image against a bare encode_image; one training epoch of 8 images
against AnomalyCLIP's uncached epoch, vlmad.bench.visualad).
``gpu_check`` (not in the default run: ``make gpu-check``) is
vlmad.bench.gpu_check.
Random weights cost exactly what trained weights cost; no quality is measured here.
"""

from __future__ import annotations

import argparse
import time


def main(argv: list[str] | None = None) -> None:
    """Run the selected sections and print their tables (``gpu_check`` hands its arguments to its own parser)."""
    import sys

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["gpu_check"]:
        from vlmad.bench import gpu_check

        gpu_check.main(argv[1:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "sections",
        nargs="*",
        default=[
            "winclip",
            "anomalyclip",
            "training",
            "calibration",
            "sweep",
            "musc",
            "pipeline",
            "export",
            "dino_fewshot",
            "visualad",
            "serve",
            "int8",
        ],
    )
    parser.add_argument("--quick", action="store_true", help="tiny backbone, seconds: checks the harness only")
    args = parser.parse_args(argv)
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, cuda={torch.cuda.is_available()}")
    done: dict[str, list[dict]] = {}
    for section in args.sections:
        start = time.perf_counter()
        if section == "winclip":
            from vlmad.bench import winclip as bench

            rows = bench.run(backbone_name="vlmad-tiny") if args.quick else bench.run()
        elif section == "anomalyclip":
            from vlmad.bench import anomalyclip as bench

            rows = bench.run(image_sizes=(64,), backbone_name="vlmad-tiny") if args.quick else bench.run()
        elif section == "training":
            from vlmad.bench import training as bench

            rows = bench.run(backbone="tiny", image_size=64, n_images=4, epochs=2) if args.quick else bench.run()
        elif section in ("serve", "int8"):  # vlmad serve under load + faults; INT8 / fp32 OpenVINO speed
            from vlmad.bench import serve as bench

            rows = bench.run(args.quick) if section == "serve" else bench.run_int8(args.quick)
        elif section == "calibration":
            from vlmad.bench import calibration as bench

            quick = {"backbone": "tiny", "image_size": 64, "n_test": 20, "n_train": 8, "extra": (), "repeats": 1}
            rows = bench.run(**quick) if args.quick else bench.run()
        elif section == "sweep":
            from vlmad.bench import sweep as bench

            rows = bench.run(ks=(1, 2), draws=2, backbone="tiny", image_size=64) if args.quick else bench.run()
        elif section == "musc":
            from vlmad.bench import musc as bench

            if args.quick:
                rows = bench.run(n_images=6, image_size=64, backbone_name="vlmad-tiny")
            elif torch.cuda.is_available():  # the GPU check: a VisA-sized category, bf16 encoder
                gpu = {"n_images": 200, "device": "cuda", "precision": "bf16", "batch_size": 16}
                rows = [*bench.run(**gpu), *bench.run(**gpu, distance_dtype="bf16")]
            else:
                rows = bench.run()
        elif section == "pipeline":
            from vlmad.bench import pipeline as bench

            # the model's 518 px rate: reused from the anomalyclip section when it ran (batch 1, CPU), else measured
            given = [
                (1 / r["anomalyclip_s"], f"AnomalyCLIP {r['backbone']} b1 518 px, {r['device']} (anomalyclip)")
                for r in done.get("anomalyclip", [])
                if r["image_size"] == 518
            ]
            quick = {"image_size": 64, "n_images": 8, "source_size": 96, "model": "vlmad-tiny"}
            rows = bench.run(**quick) if args.quick else bench.run(model_rate_given=(given or [None])[0])
        elif section == "export":
            from vlmad.bench import export as bench

            rows = bench.run(backbone_name="vlmad-tiny") if args.quick else bench.run()
        elif section == "dino_fewshot":
            from vlmad.bench import dino_fewshot as bench

            if args.quick:
                quick = {"image_size": 56, "backbone_name": "vlmad-tiny-dinov2", "aug_count": 3, "source_size": 96}
                rows = bench.run(ks=(1, 2), **quick)
            elif torch.cuda.is_available():
                rows = bench.run(device="cuda")
            else:  # ViT-g at 672 px is minutes per image on a CPU: one reference, 2 rotations per PCA pass
                rows = [*bench.run(("anomalydino",)), *bench.run(("subspacead",), ks=(1,), n_images=1, aug_count=2)]
        elif section == "visualad":
            from vlmad.bench import visualad as bench

            quick = {"image_size": 64, "backbone_name": "vlmad-tiny", "training_backbone": "tiny", "n_train": 4}
            rows = bench.run(**quick) if args.quick else bench.run()
        else:
            raise SystemExit(
                f"unknown section {section!r} "
                "(winclip, anomalyclip, training, calibration, sweep, musc, pipeline, export, dino_fewshot, visualad)"
            )
        done[section] = rows
        print(f"\n== {section} ({time.perf_counter() - start:.0f} s) ==\n{bench.format_rows(rows)}", flush=True)


if __name__ == "__main__":
    main()
