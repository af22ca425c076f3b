"""The classic toolbox, measured (issue 5): Deep Compression, KD vs plain fine-tuning, activation-aware
SVD, Tucker-2 on real 3x3 convs, QAT vs PTQ. Prints every table of the issue's Proof section.

    python bench/toolbox.py --workers 2         # full tables: kd 79 CPU-min (44 min wall), the rest 17 CPU-min
    python bench/toolbox.py --quick             # reduced run, also from a fresh clone; exit 1 if a bound fails
    python bench/toolbox.py --only kd,qat --json out.json

Parts (experiments live in bench/lowrank_share.py and bench/distill_qat.py; this file runs them,
checks their bounds and reports time):

  deepcomp  MNIST CNN: prune -> retrain -> k-means share -> centroid fine-tuning -> Huffman, bytes on
            disk of real files.                     Bound: Huffman file >= 20x smaller, <= 1 pt drop.
  kd        Fashion-MNIST CNN with half its MACs removed by brainsurgeon.prune.prune_, fine-tuned with
            Hinton KD (teacher: its dense self) vs plain cross-entropy, paired by seed, 5 seeds, all 55k
            labels, 16 epochs with function-matching augmentation (shift + mirror, the same view for
            teacher and student), for two dense models: the zoo's (30 augmented epochs) and an 8-epoch
            plain-trained one. Bounds, per dense model: MACs <= 0.55x; KD test mean within 0.5 pt of
            dense; KD mean > plain mean and KD ahead on most seeds (quick: a 3-epoch plain dense model
            trained for it, 6k labels, 6 epochs, one seed, 2k test images: KD within 1.5 pt of dense,
            KD > plain).
  minilm    all-MiniLM-L6-v2 FFN: activation-aware vs plain SVD at equal parameters (cosine to dense
            embeddings, SimLex-999 / WordSim-353).     Bound: ASVD cosine > SVD cosine.
  convs     Tucker-2 on real 3x3 convs: ResNet-20 (Fashion-MNIST) HOSVD vs HOOI (vs channel SVD/ASVD)
            with accuracy and agreement vs dense before/after a short KD fine-tune; MobileNetV2's stem
            (its only full 3x3 conv) and its large 1x1 convs (plain vs activation-aware SVD) with
            agreement on photo crops. Bounds: HOOI kernel error <= HOSVD's; ASVD agreement >= SVD's.
  qat       MNIST CNN at 4/3/2 bits: RTN, GPTQ, and QAT started from GPTQ, converted back on the grid
            and packed (quick: 4 bits). Bounds: QAT >= best PTQ; starts at GPTQ; on grid; packed within
            0.1 pt of fake-quant.

No ImageNet ResNet weights ship offline (only MobileNetV2's, see ASSETS.md), so the ResNet rows use
the CIFAR-style ResNet-20 trained on Fashion-MNIST (brainsurgeon.models, cached after first use).
--quick: small models trained for it on first use (never the 30-epoch zoo Fashion-MNIST CNN or the zoo
ResNet-20), subsets of the data, fewer steps, one budget per table; it checks every bound on real data.
From an empty cache (issue 13, 1 thread, 2 shared cores): kd 95, convs 44, qat + deepcomp 67 CPU s
(tests/slow/test_bench_quick_fresh.py). Timing: CPU seconds of this process (--threads 1 by default) and wall
seconds.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _runner import Bench, run  # noqa: E402,F401 - Bench: the type every part receives


def _parts() -> dict[str, Callable[[Bench], None]]:
    import distill_qat
    import lowrank_share

    return {"deepcomp": lowrank_share.deep_compression, "kd": distill_qat.kd_vs_finetune,
            "minilm": lowrank_share.minilm_svd, "convs": lowrank_share.conv_factorization,
            "qat": distill_qat.qat_vs_ptq}


def main(argv: list[str] | None = None, parts: Sequence[str] | None = None) -> int:
    """Run the named parts (default: all) and return 1 when a bound failed."""
    return run(_parts(), argv, parts, __doc__)


if __name__ == "__main__":
    sys.exit(main())
